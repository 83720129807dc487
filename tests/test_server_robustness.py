"""Serving safely: request timeouts (streamed or not) and client disconnects abort work, bad input is refused
before it reaches the engine, a dead engine gives 503. (SIGTERM shutdown is shown in test_server_parallel.py.)"""

from __future__ import annotations

import json
import os
import signal
import threading
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


# Each would reach the sampler and fail its step, and with it every request sharing the step.
SAMPLER_FAILURES = [
    ("/generate", {"prompts": ["hi"], "generation_kwargs": {"min_tokens": 2, "stop_token_ids": [2**63 - 1]}},
     "generation_kwargs.stop_token_ids"),
    ("/generate", {"prompts": ["hi"], "generation_kwargs": {"min_tokens": 2, "temperature": 1e39}},
     "generation_kwargs.temperature"),
    ("/chat", {"messages": [[{"role": "user", "content": "hi"}]], "temperature": 1e308,
               "generation_kwargs": {"min_tokens": 2}}, "temperature"),
]


@pytest.mark.parametrize("path,payload,field", SAMPLER_FAILURES, ids=[f[2] for f in SAMPLER_FAILURES])
def test_a_bad_request_is_refused_without_failing_the_requests_beside_it(server, path, payload, field):
    beside = {}
    neighbour = threading.Thread(target=lambda: beside.update(response=httpx.post(
        f"{server.base_url}/generate", json={"prompts": ["x"] * 2, "max_tokens": 10}, timeout=30)))
    neighbour.start()
    time.sleep(0.1)
    response = httpx.post(f"{server.base_url}{path}", json={"max_tokens": 3, **payload}, timeout=30)
    neighbour.join()

    assert response.status_code == 400 and response.json()["detail"].startswith(f"{field}: "), response.text
    assert beside["response"].status_code == 200, beside["response"].text


def test_top_k_beyond_the_vocabulary_samples_from_every_token(server):
    def completion(top_k: int) -> list[int]:
        body = {"prompts": ["hi"], "max_tokens": 8, "seed": 7, "top_k": top_k}
        return httpx.post(f"{server.base_url}/generate", json=body, timeout=30).json()["completion_ids"]

    assert completion(2**63) == completion(-1)


@pytest.mark.parametrize("path,conversation", [("/chat", [[{"role": "user", "content": "hi"}]]),
                                               ("/v1/chat/completions", [{"role": "user", "content": "hi"}])])
def test_a_chat_template_sent_with_the_request_is_never_run(server, path, conversation):
    endless = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
    body = {"messages": conversation, "chat_template_kwargs": {"chat_template": endless}}
    response = httpx.post(f"{server.base_url}{path}", json=body, timeout=10)

    assert response.status_code in (400, 422) and "chat_template_kwargs: 'chat_template'" in response.text
    assert httpx.get(f"{server.base_url}/health", timeout=5).status_code == 200


BAD_INPUTS = [
    ("/generate", {"prompts": ["a\ud800"]}, "prompts[0]: '\\ud800' at character 1 is a lone surrogate"),
    ("/chat", {"messages": [[{"role": "user", "content": "\udc00"}]]}, "messages[0][0].content: '\\udc00'"),
    ("/generate", {"prompts": [[True, 5]]}, "prompts[0][0]: must be a number, not true or false"),
    ("/generate", {"prompts": ["x"], "truncate_prompt_tokens": True}, "truncate_prompt_tokens: must be a number"),
    ("/generate", {"prompts": ["x"], "generation_kwargs": {"seed": False}}, "generation_kwargs.seed: must be a number"),
    ("/init_communicator", {"host": "http://127.0.0.1", "port": 1234, "world_size": 2},
     "host: must be a host name or IP address, without scheme or port"),
]


@pytest.mark.parametrize("path,payload,detail", BAD_INPUTS, ids=[b[2].split(":")[0] for b in BAD_INPUTS])
def test_bad_input_gets_4xx_naming_the_field(server, path, payload, detail):
    # json.dumps escapes what httpx would send raw (a lone surrogate cannot be UTF-8 encoded).
    response = httpx.post(f"{server.base_url}{path}", content=json.dumps(payload),
                          headers={"content-type": "application/json"}, timeout=30)

    assert response.status_code in (400, 422) and detail in response.json()["detail"], response.text


@pytest.mark.parametrize("path,error", [("/generate", lambda r: r.json()["detail"]),
                                        ("/v1/completions", lambda r: r.json()["error"]["message"])])
@pytest.mark.parametrize("content,content_type,said", [
    ('{"prompts": ["hi"], "prompt": "hi"}', "text/plain", "body: expected JSON sent with Content-Type: application/json"),
    ('{"prompts": [', "application/json", "body: JSON decode error"),
])
def test_a_body_that_is_not_json_is_refused_saying_so(server, path, error, content, content_type, said):
    response = httpx.post(f"{server.base_url}{path}", content=content, headers={"content-type": content_type})

    assert response.status_code in (400, 422) and error(response).startswith(said), response.text


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



