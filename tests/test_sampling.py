"""Sampling controls: support of top-k/top-p/min-p, the temperature distribution, seeds, stops,
length limits and penalties."""

import pytest
import torch
from scipy.stats import chisquare

from flywheel import LLM, SamplingParams
from flywheel.engine.sampler import Sampler
from flywheel.engine.sequence import Sequence

VOCAB = 12
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.3, 0.8, 1.2, -2.0, 0.1])


def draw(params: SamplingParams, num_draws: int, seed: int = 0, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    sampler = Sampler(len(logits), torch.device("cpu"), seed)
    seqs = [Sequence(str(i), 0, [0], params, None) for i in range(num_draws)]
    out = sampler(logits.repeat(num_draws, 1), seqs, [set()] * num_draws)
    return torch.tensor(out.token_ids)


def assert_counts_follow(counts: torch.Tensor, probs: torch.Tensor) -> None:
    expected = probs * counts.sum()
    keep = expected > 5  # chi-square needs non-tiny expected counts
    observed, expected = counts[keep].double(), expected[keep].double()
    expected *= observed.sum() / expected.sum()
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_top_k_top_p_min_p_never_sample_outside_their_support():
    order = LOGITS.argsort(descending=True)
    assert set(draw(SamplingParams(top_k=3), 4000).tolist()) == set(order[:3].tolist())
    probs = LOGITS.softmax(-1)
    # Smallest set of most likely tokens whose mass reaches 0.6.
    mass = probs[order].cumsum(0)
    nucleus = set(order[: int((mass < 0.6).sum()) + 1].tolist())
    assert set(draw(SamplingParams(top_p=0.6), 4000).tolist()) == nucleus
    above = set(torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())
    assert set(draw(SamplingParams(min_p=0.3), 4000).tolist()) == above


def test_top_p_applies_to_what_top_k_keeps():
    """As transformers' TopK then TopP warpers: the nucleus is taken of the top-k, renormalized."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    for top_k, top_p in [(2, 0.5), (3, 0.6), (4, 0.8), (5, 0.45)]:
        expected = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, LOGITS[None].clone()))
        support = set(torch.isfinite(expected[0]).nonzero().flatten().tolist())
        assert set(draw(SamplingParams(top_k=top_k, top_p=top_p), 2000).tolist()) == support


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_temperature_distribution_matches_softmax(temperature):
    num_draws = 20000
    counts = torch.bincount(draw(SamplingParams(temperature=temperature), num_draws), minlength=VOCAB)
    assert_counts_follow(counts, (LOGITS / temperature).softmax(-1))


def test_large_vocabulary_draw_keeps_support_and_distribution():
    # The CPU draw sums a large vocabulary in chunks: spread the kept tokens over chunk edges and the
    # last, partial chunk, and leave zero-probability tokens beside them.
    vocab = 2 * 1024 + 300
    kept = torch.tensor([0, 1, 5, 1022, 1023, 1024, 1025, 2047, 2048, 2049, 2200, vocab - 2])
    logits = torch.full((vocab,), -30.0)
    logits[kept] = torch.linspace(0.0, 2.0, len(kept))
    logits[vocab - 1] = float("-inf")
    num_draws = 20000
    drawn = draw(SamplingParams(top_k=len(kept)), num_draws, logits=logits)
    assert set(drawn.tolist()) <= set(kept.tolist())
    counts = torch.bincount(drawn, minlength=vocab)[kept]
    assert_counts_follow(counts, logits[kept].softmax(-1))


def test_greedy_takes_the_argmax():
    assert set(draw(SamplingParams(temperature=0.0), 50).tolist()) == {0}


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    return LLM(tiny_checkpoints["qwen2"], dtype="float32")


def test_seed_reproducible_whatever_else_is_in_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, max_tokens=16, seed=1234, n=2, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], seeded)[0]
    crowd = llm.generate(
        [[1, 2], [5, 6, 7], list(range(50, 80))],
        [SamplingParams(max_tokens=20, ignore_eos=True), seeded, SamplingParams(n=3, max_tokens=9, ignore_eos=True)],
    )[1]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in crowd.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids
    unseeded = [llm.generate([[5, 6, 7]], SamplingParams(max_tokens=16, ignore_eos=True))[0].outputs[0].token_ids for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_max_tokens_and_min_tokens(llm):
    # Every token but 65 stops the sequence, so the first min_tokens tokens can only be 65.
    stop_ids = [t for t in range(llm.engine.hf_config.vocab_size) if t != 65]
    [out] = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=5, min_tokens=4, stop_token_ids=stop_ids, seed=0))
    assert out.outputs[0].token_ids[:4] == [65] * 4
    assert len(out.outputs[0].token_ids) == 5
    [out] = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=7, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 7 and out.outputs[0].finish_reason == "length"


def test_stop_token_ids_and_eos(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    tokens = llm.generate([[1, 2, 3]], greedy)[0].outputs[0].token_ids
    stop_at = tokens[5]
    first = tokens.index(stop_at)
    [out] = llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=[stop_at]))
    assert out.outputs[0].token_ids == tokens[: first + 1]
    assert out.outputs[0].finish_reason == "stop"


def test_eos_stops_unless_ignored(llm):
    # Any sequence that samples EOS must stop there; with ignore_eos it must run to max_tokens.
    params = SamplingParams(temperature=3.0, max_tokens=80)
    eos_ids = llm.engine.eos_token_ids
    outputs = llm.generate([[i] for i in range(24)], params)
    stopped = [o.outputs[0] for o in outputs if o.outputs[0].finish_reason == "stop"]
    assert stopped, "no completion sampled EOS at temperature 3"
    assert all(c.token_ids[-1] in eos_ids and not set(c.token_ids[:-1]) & eos_ids for c in stopped)
    ignoring = llm.generate([[i] for i in range(8)], SamplingParams(temperature=3.0, max_tokens=30, seed=0, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 30 for o in ignoring)


def test_stop_strings_cut_the_text(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    full = llm.generate([[104, 105]], greedy)[0].outputs[0]
    stop = full.text[6:8]
    assert stop
    [out] = llm.generate([[104, 105]], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop]))
    cut = full.text.find(stop)
    assert out.outputs[0].text == full.text[:cut]
    assert out.outputs[0].finish_reason == "stop"
    assert len(out.outputs[0].token_ids) < len(full.token_ids)


def test_detokenize_false_leaves_the_text_empty_and_the_tokenizer_alone(llm, monkeypatch):
    greedy = dict(temperature=0.0, max_tokens=12, ignore_eos=True)
    [decoded] = llm.generate([[104, 105]], SamplingParams(**greedy))

    def refuse(*args, **kwargs):
        raise AssertionError("decoded with detokenize=False")

    monkeypatch.setattr(llm.engine.tokenizer, "decode", refuse)
    [raw] = llm.generate([[104, 105]], SamplingParams(detokenize=False, **greedy))
    assert decoded.outputs[0].text and raw.outputs[0].text == ""
    assert raw.outputs[0].token_ids == decoded.outputs[0].token_ids


def test_stop_strings_need_detokenize():
    with pytest.raises(ValueError, match="stop strings need detokenize=True"):
        SamplingParams(stop=["\n"], detokenize=False)


def test_penalties_change_what_is_sampled(llm):
    prompt = [7, 7, 7, 7]
    greedy = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    penalized = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0)
    )[0].outputs[0]
    repeated = max(greedy.token_ids.count(t) for t in set(greedy.token_ids))
    assert max(penalized.token_ids.count(t) for t in set(penalized.token_ids)) <= repeated
    assert penalized.token_ids != greedy.token_ids


def test_repetition_penalty_matches_its_definition():
    # Token 0 was seen: its positive logit is divided by the penalty; token 6 (negative) multiplied.
    sampler = Sampler(VOCAB, torch.device("cpu"), 0)
    params = SamplingParams(temperature=0.0, repetition_penalty=4.0, logprobs=VOCAB - 1)
    seq = Sequence("r", 0, [0, 6], params, None)
    out = sampler(LOGITS[None], [seq], [set()])
    expected = LOGITS.clone()
    expected[0] /= 4.0
    expected[6] *= 4.0
    assert out.token_ids == [int(expected.argmax())]
    assert out.logprobs[0] == pytest.approx(float(expected.log_softmax(-1).max()), abs=1e-6)


def test_streamed_request_reports_its_progress_every_step(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, stop=["\x00\x01"])
    engine.add_request("streamed", [104, 105], params, stream=True)
    engine.add_request("quiet", [104, 105], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    seen = {"streamed": [], "quiet": []}
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen[output.request_id].append(output)
    assert [o.finished for o in seen["quiet"]] == [True]
    streamed = seen["streamed"]
    assert streamed[-1].finished and not any(o.finished for o in streamed[:-1])
    assert [len(o.outputs[0].token_ids) for o in streamed] == [1, 2, 3, 4, 5, 6]
    texts = [o.outputs[0].text for o in streamed]
    assert all(final.startswith(partial) for partial, final in zip(texts, texts[1:]))
    assert streamed[-1].outputs[0].token_ids == seen["quiet"][0].outputs[0].token_ids


def test_a_streamed_request_of_several_completions_is_reported_finished_once(llm):
    """Its last completion may finish after a sibling's progress was recorded in the same step."""
    engine = llm.engine
    for request_id, prompt in (("a", [104, 105]), ("b", [97, 98, 99])):
        engine.add_request(request_id, prompt, SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=6,
                                                              ignore_eos=True), stream=True)
    seen = {"a": [], "b": []}
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen[output.request_id].append(output.finished)
    assert all(finished[-1] and finished.count(True) == 1 for finished in seen.values())
