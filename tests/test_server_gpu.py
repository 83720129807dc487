"""The server on a GPU: generation equals the offline engine; weights pushed from the CPU (Gloo) and
from a second GPU (NCCL) reach it; a client on the server's own GPU is refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from flywheel import GenerationClient, LLM, SamplingParams
from flywheel.server.launch import free_port, launch_server

pytestmark = pytest.mark.gpu

PROMPTS = ["hello there", "The quick brown fox", "1 2 3 4"]
GREEDY = dict(temperature=0.0, max_tokens=10)


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with launch_server(tiny_checkpoints["qwen2"], log_path=log, dtype="float32", max_model_len=512,
                       gpu_memory_utilization=0.3, env={"CUDA_VISIBLE_DEVICES": "0"}) as running:
        yield running


@pytest.fixture(scope="module")
def references(tiny_checkpoints) -> dict[str, list[list[int]]]:
    result = {}
    for name in ("qwen2", "qwen2_b"):
        llm = LLM(tiny_checkpoints[name], dtype="float32", max_model_len=512, gpu_memory_utilization=0.3)
        result[name] = [c.token_ids for out in llm.generate(PROMPTS, SamplingParams(**GREEDY)) for c in out.outputs]
        llm.shutdown()
    return result


def push_and_generate(server, checkpoint: str, device: str) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device)
    with GenerationClient(base_url=server.base_url, group_port=free_port(), connection_timeout=60) as client:
        client.init_communicator(device=device)
        client.update_model_params(model)
        return client.generate(PROMPTS, **GREEDY)["completion_ids"]


def test_greedy_generate_matches_offline_engine(server, references):
    with GenerationClient(base_url=server.base_url, connection_timeout=60) as client:
        assert client.generate(PROMPTS, **GREEDY)["completion_ids"] == references["qwen2"]


def test_weights_pushed_from_the_cpu_over_gloo(server, references, tiny_checkpoints):
    assert push_and_generate(server, tiny_checkpoints["qwen2_b"], "cpu") == references["qwen2_b"]
    assert push_and_generate(server, tiny_checkpoints["qwen2"], "cpu") == references["qwen2"]


@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU for the client")
def test_weights_pushed_from_another_gpu_over_nccl(server, references, tiny_checkpoints):
    assert push_and_generate(server, tiny_checkpoints["qwen2_b"], "cuda:1") == references["qwen2_b"]
    assert push_and_generate(server, tiny_checkpoints["qwen2"], "cuda:1") == references["qwen2"]


def test_client_on_the_server_gpu_is_refused(server):
    with GenerationClient(base_url=server.base_url, group_port=free_port(), connection_timeout=60) as client:
        with pytest.raises(ValueError, match="one the server uses"):
            client.init_communicator(device="cuda:0", timeout=10)
