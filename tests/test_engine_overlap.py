"""The overlapped decode (a step launched before the previous step's tokens reach the host) gives the
same completions as decode step by step.

On one GPU the engine overlaps its steps; here the CPU's sampler stands in for the GPU draw, so the
bookkeeping of that path (placeholders, cached positions, stops with one token too many computed)
runs in CI.
"""

import pytest
import torch

from flywheel import LLM, SamplingParams

PROMPTS = [list(range(20, 57)), [5, 6, 7], [9] * 16, list(range(100, 133))]


class _DrawnOnHost:
    """A draw already on the host, in the shape of the GPU's pending draw."""

    def __init__(self, output) -> None:
        self.output = output
        self.token_ids = torch.tensor(output.token_ids)

    def result(self):
        return self.output


def overlap_on_cpu(llm: LLM) -> None:
    engine, sampler = llm.engine, llm.engine.sampler
    engine.overlap_decode = True
    sampler.can_draw_async = lambda seqs: True
    sampler.draw_async = lambda logits, seqs: _DrawnOnHost(sampler(logits, seqs, [s.stop_token_ids for s in seqs]))


def completions(llm: LLM, params: SamplingParams) -> tuple[list, list[float]]:
    """(Each completion's tokens and finish reason, all their sampled logprobs)."""
    outputs = [c for output in llm.generate(PROMPTS, params, use_tqdm=False) for c in output.outputs]
    return [(c.token_ids, c.finish_reason) for c in outputs], [v for c in outputs for v in c.logprobs.sampled]


def assert_same(actual, expected) -> None:
    assert actual[0] == expected[0]
    # A prefix-cache hit computes the rest of the prompt alone: float32 sums in another order.
    assert actual[1] == pytest.approx(expected[1], abs=1e-4)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=0),
    SamplingParams(n=3, temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2),
    SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=30, logprobs=0, stop_token_ids=[40, 41, 42, 43]),
], ids=["greedy", "groups", "stops"])
def test_overlapped_decode_matches_step_by_step(tiny_checkpoints, params):
    plain = LLM(tiny_checkpoints["qwen2"], dtype="float32", block_size=4)
    overlapped = LLM(tiny_checkpoints["qwen2"], dtype="float32", block_size=4)
    overlap_on_cpu(overlapped)
    expected = completions(plain, params)
    assert_same(completions(overlapped, params), expected)
    if params.stop_token_ids:
        assert {reason for _, reason in expected[0]} == {"stop", "length"}
    # The cache agrees with the tokens: a second round reuses the prompts' blocks and gives the same.
    assert_same(completions(overlapped, params), expected)
    assert overlapped.engine.stats.prefix_cache_hit_tokens > 0
