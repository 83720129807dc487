"""GenerationClient without a server: it fails fast and says what to do."""

from __future__ import annotations

import time

import pytest

from flywheel import GenerationClient
from flywheel.client import _hf_name
from flywheel.server.launch import free_port


def test_no_server_raises_connection_error_after_the_timeout():
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="flywheel serve"):
        GenerationClient(server_port=free_port(), connection_timeout=1.0)

    assert time.monotonic() - start < 5


@pytest.mark.parametrize("base_url", ["localhost:8000", "ftp://host:1", "http://", "http://127.0.0.1:99999",
                                      "http://127.0.0.1:abc", "http://[::1"])
def test_malformed_base_url_is_refused(base_url):
    with pytest.raises(ValueError, match="base_url"):
        GenerationClient(base_url=base_url, connection_timeout=0.1)


# A NaN or infinite timeout would make the wait for the server endless.
@pytest.mark.parametrize("argument,value", [("server_port", 0), ("server_port", "8000"), ("group_port", 70000),
                                            ("connection_timeout", float("nan")), ("connection_timeout", float("inf")),
                                            ("connection_timeout", -1), ("request_timeout", float("nan"))])
def test_a_bad_argument_is_refused_by_name_before_any_wait(argument, value):
    start = time.monotonic()
    with pytest.raises(ValueError, match=argument):
        GenerationClient(**{"server_port": free_port(), "connection_timeout": 0.1, argument: value})

    assert time.monotonic() - start < 1


@pytest.mark.parametrize("wrapped", ["module._orig_mod.model.norm.weight", "_orig_mod.module.model.norm.weight",
                                     "module.model.norm.weight", "model.norm.weight"])
def test_wrapped_parameter_names_are_pushed_under_their_hugging_face_names(wrapped):
    assert _hf_name(wrapped) == "model.norm.weight"
