"""The overlapped steps (a decode launched before the previous step's tokens, a prefill's included,
reach the host) give the same completions as steps run one by one.

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


def overlap_on_cpu(llm: LLM) -> list[int]:
    """Make `llm` overlap its steps; returns the list that records the rows of every draw left in flight."""
    engine, sampler = llm.engine, llm.engine.sampler
    engine.overlap_decode = True
    sampler.can_draw_async = lambda seqs: True
    in_flight = []

    def draw_async(logits, seqs):
        in_flight.append(len(seqs))
        return _DrawnOnHost(sampler(logits, seqs, [s.stop_token_ids for s in seqs]))

    sampler.draw_async = draw_async
    return in_flight


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
    SamplingParams(n=2, temperature=0.0, max_tokens=1, logprobs=0),
], ids=["greedy", "groups", "stops", "the prefill's token only"])
def test_overlapped_decode_matches_step_by_step(tiny_checkpoints, params):
    plain = LLM(tiny_checkpoints["qwen2"], dtype="float32", block_size=4)
    overlapped = LLM(tiny_checkpoints["qwen2"], dtype="float32", block_size=4)
    in_flight = overlap_on_cpu(overlapped)
    expected = completions(plain, params)
    assert_same(completions(overlapped, params), expected)
    # Every step was left in flight, the prefill of all the prompts' sequences first.
    assert len(in_flight) == overlapped.engine.stats.steps and in_flight[0] == len(PROMPTS) * params.n
    if params.stop_token_ids:
        assert {reason for _, reason in expected[0]} == {"stop", "length"}
    # The cache agrees with the tokens: a second round reuses the prompts' blocks and gives the same.
    assert_same(completions(overlapped, params), expected)
    assert overlapped.engine.stats.prefix_cache_hit_tokens > 0


def test_prompts_prefilled_in_several_batches_match_step_by_step(tiny_checkpoints):
    """A prefill in flight while other prompts wait: it completes before they are prefilled."""
    options = dict(dtype="float32", block_size=4, max_model_len=48, max_num_batched_tokens=48)
    params = SamplingParams(n=2, temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
    plain = LLM(tiny_checkpoints["qwen2"], **options)
    overlapped = LLM(tiny_checkpoints["qwen2"], **options)
    overlap_on_cpu(overlapped)
    expected = completions(plain, params)
    assert_same(completions(overlapped, params), expected)
    assert overlapped.engine.stats.steps == plain.engine.stats.steps
