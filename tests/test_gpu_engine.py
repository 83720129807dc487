"""The engine on a GPU: greedy tokens equal transformers' in float32; bf16 logits within tolerance."""

import pytest
import torch

from conftest import hf_greedy
from flywheel import LLM, SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 6, 7], list(range(20, 57)), [9] * 16, list(range(100, 117)), [42]]


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3", "llama"])
@pytest.mark.parametrize("enforce_eager", [True, False])
def test_gpu_greedy_matches_transformers_float32(architecture, enforce_eager, tiny_checkpoints, hf_models):
    llm = LLM(tiny_checkpoints[architecture], dtype="float32", device="cuda", enforce_eager=enforce_eager,
              gpu_memory_utilization=0.3, max_num_seqs=32)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    for prompt, output in zip(PROMPTS, llm.generate(PROMPTS, greedy)):
        assert output.outputs[0].token_ids == hf_greedy(hf_models[architecture], prompt, 24)


def test_gpu_bf16_logprobs_within_tolerance(tiny_checkpoints, hf_models):
    llm = LLM(tiny_checkpoints["qwen2"], dtype="bfloat16", device="cuda", gpu_memory_utilization=0.3, max_num_seqs=32)
    prompt = list(range(30, 60))
    completion = llm.generate([prompt], SamplingParams(max_tokens=16, logprobs=0, seed=0, ignore_eos=True))[0].outputs[0]
    ids = torch.tensor([prompt + completion.token_ids])
    with torch.no_grad():
        reference = torch.log_softmax(hf_models["qwen2"](ids).logits[0, len(prompt) - 1 : -1], dim=-1)
    expected = reference.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
    got = torch.tensor([next(iter(e.values())).logprob for e in completion.logprobs])
    assert torch.allclose(got, expected, atol=0.1, rtol=0.05), (got - expected).abs().max()


def test_gpu_kv_cache_sized_from_memory(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["qwen2"], dtype="bfloat16", device="cuda", gpu_memory_utilization=0.2)
    free, total = torch.cuda.mem_get_info()
    cache_bytes = llm.engine.num_blocks * llm.engine.runner.block_bytes
    assert 0.05 * total < cache_bytes < 0.2 * total
