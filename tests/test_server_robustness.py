"""Serving safely: request timeouts (streamed or not) and client disconnects abort work, a dead engine gives 503.
(SIGTERM shutdown is shown in test_server_parallel.py.)"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch

from flywheel import GenerationClient
from flywheel.server.launch import ServerProcess, free_port

LONG = dict(prompts=["x"] * 16, temperature=1.0, max_tokens=1000, generation_kwargs={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = ServerProcess(tiny_checkpoints["qwen2"], log_path=log, request_timeout=1, kv_cache_memory_gb=0.05,
                        max_model_len=1024, max_num_seqs=4, communicator_timeout=3).wait_ready()
    yield srv
    srv.stop()


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def engine_workers(pid: int) -> list[int]:
    return [child for child in children(pid)
            if "resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")]


def engines_idle(base_url: str) -> bool:
    engines = httpx.get(f"{base_url}/stats", timeout=30).json()["engines"]
    return not any(engine["busy"] for engine in engines)


def test_request_over_the_timeout_gets_504_and_is_aborted(server):
    response = httpx.post(f"{server.base_url}/generate", json=LONG, timeout=30)

    assert response.status_code == 504
    assert "request_timeout" in response.json()["detail"]
    assert engines_idle(server.base_url)


def test_client_that_disconnects_has_its_work_aborted(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/generate", json={**LONG, "prompts": ["y"] * 16}, timeout=0.3)
    deadline = time.monotonic() + 5  # the server notices the disconnect within its poll interval
    while not engines_idle(server.base_url) and time.monotonic() < deadline:
        time.sleep(0.2)

    assert engines_idle(server.base_url)
    response = httpx.post(f"{server.base_url}/generate", json={"prompts": ["hi"], "max_tokens": 4}, timeout=30)
    assert response.status_code == 200


def test_stream_over_the_timeout_ends_with_an_error_event_and_is_aborted(server):
    body = {"prompt": "z", "max_tokens": 1000, "ignore_eos": True, "n": 4, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=30) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]

    assert response.status_code == 200
    assert json.loads(events[0])["choices"][0]["index"] in range(4)
    assert json.loads(events[-1])["error"]["type"] == "timeout_error" and "request_timeout" in events[-1]
    assert engines_idle(server.base_url)


def test_request_the_engine_refuses_gets_400_saying_why(server):
    response = httpx.post(f"{server.base_url}/generate", json={"prompts": ["hi"], "n": 8}, timeout=30)

    assert response.status_code == 400
    assert "n (8) must be <= max_num_seqs (4)" in response.json()["detail"]


def test_init_communicator_times_out_when_the_client_never_joins(server):
    started = time.monotonic()
    response = httpx.post(f"{server.base_url}/init_communicator",
                          json={"host": "127.0.0.1", "port": free_port(), "world_size": 2}, timeout=60)
    assert response.status_code == 504 and "did the client join" in response.json()["detail"]
    assert time.monotonic() - started < 30
    assert httpx.post(f"{server.base_url}/generate", json={"prompts": ["hi"], "max_tokens": 2}).status_code == 200


def test_an_update_whose_tensors_never_come_closes_the_group_on_both_ends(server, tiny_checkpoints):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2"])
    with GenerationClient(base_url=server.base_url, group_port=free_port(), connection_timeout=30) as client:
        client.init_communicator(device="cpu", timeout=10)
        with pytest.raises(ValueError, match="meta device"):  # refused before the server hears of it
            client.update_named_params([("model.norm.weight", torch.empty(64, device="meta"))])
        client.update_model_params(model)  # the group is still whole

        announce = {"params": [{"name": "model.norm.weight", "dtype": "float32", "shape": [64]}]}
        assert client.http.post("/batch_update_named_params", json=announce).status_code == 200  # nothing follows
        deadline = time.monotonic() + 60
        while client.http.post("/close_communicator?stale_only=true", timeout=30).status_code == 409:
            assert time.monotonic() < deadline, "the server kept the group of the failed update open"
        with pytest.raises(ValueError, match="409.*init_communicator"):
            client.update_model_params(model)

        client.close_communicator()
        client.init_communicator(device="cpu", timeout=10)
        client.update_model_params(model)


def test_dead_engine_worker_gives_503_with_a_reason(server):
    (worker,) = engine_workers(server.process.pid)
    os.kill(worker, signal.SIGKILL)
    time.sleep(1.5)

    health = httpx.get(f"{server.base_url}/health")
    generate = httpx.post(f"{server.base_url}/generate", json={"prompts": ["hi"]})
    assert health.status_code == 503 and "exited" in health.json()["detail"]
    assert generate.status_code == 503 and "restart" in generate.json()["detail"]
    with pytest.raises(ConnectionError, match="not healthy"):
        GenerationClient(base_url=server.base_url, connection_timeout=1)


