"""Data parallel (dp=2) and tensor parallel (tp=2, Gloo on CPU) servers: greedy generation equals the
offline LLM, and a weight push reaches every rank of every engine."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from flywheel import GenerationClient, LLM, SamplingParams
from flywheel.server.launch import free_port, launch_server

PROMPTS = ["hello there", "The quick brown fox", "1 2 3 4", "abc", "zzz top", "x"]
GREEDY = dict(temperature=0.0, max_tokens=10)


@pytest.fixture(scope="module", params=[(1, 2), (2, 1)], ids=["tp1-dp2", "tp2-dp1"])
def server(request, tiny_checkpoints, tmp_path_factory):
    tp, dp = request.param
    log = tmp_path_factory.mktemp("server") / "server.log"
    with launch_server(tiny_checkpoints["qwen2"], log_path=log, tensor_parallel_size=tp, data_parallel_size=dp,
                       kv_cache_memory_gb=0.05) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with GenerationClient(base_url=server.base_url, group_port=free_port(), connection_timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def references(tiny_checkpoints) -> dict[str, list[list[int]]]:
    result = {}
    for name in ("qwen2", "qwen2_b"):
        llm = LLM(tiny_checkpoints[name], kv_cache_memory_gb=0.05)
        result[name] = [c.token_ids for out in llm.generate(PROMPTS, SamplingParams(**GREEDY)) for c in out.outputs]
    return result


def test_world_size_counts_every_engine_rank(client):
    assert client.get_world_size() == 2


def test_greedy_generate_matches_offline_llm_in_order(client, references):
    out = client.generate(PROMPTS, n=2, **GREEDY)

    assert out["completion_ids"] == [ids for ids in references["qwen2"] for _ in range(2)]
    engines = client.http.get("/stats").json()["engines"]
    assert all(engine["generated_tokens"] > 0 for engine in engines)  # with dp=2, both engines took prompts


def test_a_prompt_sampled_on_every_engine_gets_different_completions(client):
    out = client.generate(["hello there"] * 4, temperature=1.0, max_tokens=10)
    assert len({tuple(ids) for ids in out["completion_ids"]}) == 4


def test_pushed_weights_reach_every_rank(client, references, tiny_checkpoints):
    model_b = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["qwen2_b"], dtype=torch.float32)
    client.init_communicator(device="cpu")

    client.update_model_params(model_b, bucket_bytes=128 * 1024)
    pushed = client.generate(PROMPTS, **GREEDY)["completion_ids"]
    client.close_communicator()

    assert pushed == references["qwen2_b"]


def descendants(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    direct = [int(p) for p in path.read_text().split()] if path.exists() else []
    return direct + [grandchild for child in direct for grandchild in descendants(child)]


def test_sigterm_stops_the_server_its_engines_and_their_ranks(server, client):
    client.close()
    processes = descendants(server.process.pid)
    assert len(processes) >= 2  # the engine workers (dp=2) or the engine and its second rank (tp=2)

    start = time.monotonic()
    code = server.stop()

    assert code in (0, -signal.SIGTERM), server.log_tail()
    assert time.monotonic() - start < 20
    deadline = time.monotonic() + 5  # the multiprocessing resource tracker leaves just after its parent
    while any(alive(pid) for pid in processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [(pid, Path(f"/proc/{pid}/cmdline").read_bytes()[:120]) for pid in processes if alive(pid)]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; only its parent (gone) would have reaped it
