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


def test_gpu_memory_share_ignores_what_was_allocated_before_the_engine(tiny_checkpoints):
    """gpu_memory_utilization is each engine's own share: a second engine (or a trainer's model loaded
    first) does not shrink it, and no engine takes more than is free."""
    first = LLM(tiny_checkpoints["qwen2"], dtype="bfloat16", device="cuda", gpu_memory_utilization=0.2)
    second = LLM(tiny_checkpoints["qwen2"], dtype="bfloat16", device="cuda", gpu_memory_utilization=0.2)
    assert abs(second.engine.num_blocks - first.engine.num_blocks) < 0.05 * first.engine.num_blocks
    free, _ = torch.cuda.mem_get_info()
    third = LLM(tiny_checkpoints["qwen2"], dtype="bfloat16", device="cuda", gpu_memory_utilization=0.95)
    assert third.engine.num_blocks * third.engine.runner.block_bytes < free
    for llm in (first, second, third):
        llm.sleep()  # their caches go back for the tests that follow


def test_gpu_wake_up_recaptures_only_the_graphs_in_use(tiny_checkpoints, hf_models):
    llm = LLM(tiny_checkpoints["qwen2"], dtype="float32", device="cuda", gpu_memory_utilization=0.3, max_num_seqs=64)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = [hf_greedy(hf_models["qwen2"], prompt, 24) for prompt in PROMPTS]
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy)] == expected
    for _ in range(2):
        llm.sleep()
        llm.wake_up()
        graphs = llm.engine.runner.decode_graphs
        assert set(graphs.graphs) == {8}  # the five prompts decode as one padded batch of 8
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy)] == expected
    llm.generate([[1, 2, 3]] * 20, greedy)  # a size not captured yet: captured when first needed
    assert 32 in llm.engine.runner.decode_graphs.graphs


def test_gpu_sampled_logprob_and_rank_agree_between_fast_and_processed_paths(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["qwen2"], dtype="float32", device="cuda", gpu_memory_utilization=0.3, max_num_seqs=32)
    fast = SamplingParams(n=4, max_tokens=32, logprobs=0, seed=3, ignore_eos=True)  # the draw kernel alone
    processed = SamplingParams(n=4, max_tokens=32, logprobs=2, seed=3, ignore_eos=True)  # full log-softmax
    got = llm.generate(PROMPTS, fast)
    want = llm.generate(PROMPTS, processed)
    for got_request, want_request in zip(got, want):
        for got_completion, want_completion in zip(got_request.outputs, want_request.outputs):
            assert got_completion.token_ids == want_completion.token_ids
            for token, got_step, want_step in zip(got_completion.token_ids, got_completion.logprobs,
                                                  want_completion.logprobs):
                assert len(got_step) == 1
                assert got_step[token].rank == want_step[token].rank
                assert abs(got_step[token].logprob - want_step[token].logprob) < 1e-4


def test_gpu_overlapped_decode_equals_step_by_step(tiny_checkpoints):
    """Seeded draws do not depend on the batch, so launching each decode step before the previous
    one's tokens are known must not change a completion, its stops or its logprobs."""
    llm = LLM(tiny_checkpoints["qwen2"], dtype="float32", device="cuda", gpu_memory_utilization=0.3, max_num_seqs=64)
    vocab = llm.engine.hf_config.vocab_size
    # Even prompts stop on one token in nine (almost surely within their length); odd ones can only
    # reach their length. Sequences stop at different steps, while later steps are in flight.
    params = [
        SamplingParams(n=3, seed=index, max_tokens=40 - 5 * index, logprobs=0,
                       stop_token_ids=list(range(index, vocab, 9)) if index % 2 == 0 else [], ignore_eos=index % 2 == 1)
        for index in range(len(PROMPTS))
    ]

    def completions():
        return [(c.token_ids, c.finish_reason, [next(iter(step.values())).logprob for step in c.logprobs])
                for output in llm.generate(PROMPTS, params) for c in output.outputs]

    assert llm.engine.overlap_decode
    overlapped = completions()
    llm.engine.overlap_decode = False
    step_by_step = completions()
    assert {reason for _, reason, _ in step_by_step} == {"stop", "length"}
    for (ids, reason, logprobs), (want_ids, want_reason, want_logprobs) in zip(overlapped, step_by_step):
        assert (ids, reason) == (want_ids, want_reason)
        assert logprobs == pytest.approx(want_logprobs, abs=1e-5)
