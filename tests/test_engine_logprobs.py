"""Logprobs of sampled tokens equal transformers' log-softmax over the same sequence (float32)."""

import math
import pickle

import pytest
import torch

from flywheel import LLM, SamplingParams
from flywheel.engine.outputs import Logprob, TokenLogprobs


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    return LLM(tiny_checkpoints["qwen3"], dtype="float32")


def reference_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1] / temperature
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_match_transformers(llm, hf_models, temperature):
    prompts = [[3, 4, 5, 6], list(range(30, 51))]
    params = SamplingParams(temperature=temperature, max_tokens=12, logprobs=3, seed=7, ignore_eos=True)
    for prompt, output in zip(prompts, llm.generate(prompts, params)):
        completion = output.outputs[0]
        reference = reference_logprobs(hf_models["qwen3"], prompt, completion.token_ids, temperature)
        assert len(completion.logprobs) == len(completion.token_ids) == 12
        for position, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
            first_token, first = next(iter(entry.items()))
            assert first_token == token
            assert first.logprob == pytest.approx(reference[position, token].item(), abs=1e-4)
            assert first.rank == int((reference[position] > reference[position, token]).sum()) + 1
            top_values, top_ids = reference[position].topk(3)
            for top_id, value in zip(top_ids.tolist(), top_values.tolist()):
                assert entry[top_id].logprob == pytest.approx(value, abs=1e-4)
        assert completion.cumulative_logprob == pytest.approx(sum(completion.logprobs.sampled), abs=1e-4)


def test_truncated_sampling_reports_full_vocabulary_logprobs(llm, hf_models):
    # The trainer scores completions over the whole vocabulary: logprobs renormalized over what top-k,
    # top-p or min-p kept would put the kept mass S into every importance-sampling ratio.
    prompt = [8, 9, 10, 11]
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.7, min_p=0.05, max_tokens=10, logprobs=0, seed=3,
                            ignore_eos=True)
    completion = llm.generate([prompt], params)[0].outputs[0]
    reference = reference_logprobs(hf_models["qwen3"], prompt, completion.token_ids, 0.8)
    kept_mass = 1.0
    for position, token in enumerate(completion.token_ids):
        assert completion.logprobs.sampled[position] == pytest.approx(reference[position, token].item(), abs=1e-4)
        kept_mass = min(kept_mass, reference[position].exp().topk(6).values.sum().item())
    assert kept_mass < 0.9  # truncation did drop mass that renormalized logprobs would have shown


def test_raw_logprobs_ignore_temperature(llm, hf_models):
    prompt = [10, 11, 12]
    params = SamplingParams(temperature=0.5, max_tokens=6, logprobs=0, logprobs_mode="raw", seed=1, ignore_eos=True)
    completion = llm.generate([prompt], params)[0].outputs[0]
    reference = reference_logprobs(hf_models["qwen3"], prompt, completion.token_ids, 1.0)
    for position, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        assert list(entry) == [token]
        assert entry[token].logprob == pytest.approx(reference[position, token].item(), abs=1e-4)
        assert completion.logprobs.sampled[position] == entry[token].logprob


def test_no_logprobs_unless_asked(llm):
    completion = llm.generate([[1, 2]], SamplingParams(max_tokens=3))[0].outputs[0]
    assert completion.logprobs is None
    assert math.isfinite(completion.cumulative_logprob)


def test_token_logprobs_read_as_one_dict_per_token_sampled_first():
    logprobs = TokenLogprobs(num_top=2)
    logprobs.append(7, -0.5, 1, ([7, 3], [-0.5, -1.5]))  # the sampled token is also the most likely
    logprobs.append(4, -2.0, 3, ([1, 3], [-0.2, -1.9]))
    expected = [{7: Logprob(-0.5, 1), 3: Logprob(-1.5, 2)},
                {4: Logprob(-2.0, 3), 1: Logprob(-0.2, 1), 3: Logprob(-1.9, 2)}]
    assert len(logprobs) == 2 and logprobs == expected and list(logprobs) == expected
    assert [list(entry) for entry in logprobs] == [[7, 3], [4, 1, 3]]
    assert logprobs[-1] == expected[1] and logprobs[1:] == expected[1:] and logprobs[5:] == []
    with pytest.raises(IndexError):
        logprobs[2]
    assert list(logprobs.sampled) == [-0.5, -2.0]
    assert pickle.loads(pickle.dumps(logprobs)) == expected


def test_token_logprobs_without_top_k_hold_the_sampled_token_alone():
    logprobs = TokenLogprobs()
    logprobs.append(9, -3.0, 12)
    logprobs.append(2, -0.1, 1)
    assert logprobs == [{9: Logprob(-3.0, 12)}, {2: Logprob(-0.1, 1)}]
    assert list(logprobs.sampled) == [-3.0, -0.1]
