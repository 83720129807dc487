"""Serving safely: request timeouts and client disconnects abort work, a dead engine gives 503,
SIGTERM shuts everything down cleanly."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from flywheel import GenerationClient
from flywheel.server.launch import ServerProcess

LONG = dict(prompts=["x"] * 16, temperature=1.0, max_tokens=1000, generation_kwargs={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = ServerProcess(tiny_checkpoints["qwen2"], log_path=log, request_timeout=1, kv_cache_memory_gb=0.05,
                        max_model_len=1024).wait_ready()
    yield srv
    srv.stop()


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def engine_workers(pid: int) -> list[int]:
    return [child for child in children(pid)
            if "resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")]


def short_generation_seconds(base_url: str) -> float:
    start = time.monotonic()
    response = httpx.post(f"{base_url}/generate", json={"prompts": ["hi"], "max_tokens": 4}, timeout=30)
    assert response.status_code == 200, response.text
    return time.monotonic() - start


def test_request_over_the_timeout_gets_504_and_is_aborted(server):
    response = httpx.post(f"{server.base_url}/generate", json=LONG, timeout=30)

    assert response.status_code == 504
    assert "request_timeout" in response.json()["detail"]
    assert short_generation_seconds(server.base_url) < 1.0  # the aborted sequences no longer run


def test_client_that_disconnects_has_its_work_aborted(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/generate", json={**LONG, "prompts": ["y"] * 16}, timeout=0.3)
    time.sleep(0.5)

    assert short_generation_seconds(server.base_url) < 1.0


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


def test_sigterm_stops_the_server_and_its_workers(tiny_checkpoints, tmp_path):
    server = ServerProcess(tiny_checkpoints["qwen2"], log_path=tmp_path / "log", data_parallel_size=2,
                           kv_cache_memory_gb=0.05).wait_ready()
    workers = engine_workers(server.process.pid)
    assert len(workers) == 2

    start = time.monotonic()
    code = server.stop()

    assert code == 0, server.log_tail()
    assert time.monotonic() - start < 15
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
