"""Per-token logprobs and entropies (chunked float32 with a recomputing backward) against plain log_softmax."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from flywheel.testing import tiny_config
from flywheel.trainer import logprobs
from flywheel.trainer.logprobs import completion_logps, token_logps_and_entropy
from flywheel.trainer.prompt_packing import enable_packed_prompts, packs_prompts

VOCAB = 50


def reference(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float):
    """log_softmax in float64 of the logits over temperature: logps, entropies, and the logits' gradient."""
    logits = logits.detach().double().requires_grad_()
    log_probs = (logits / temperature).log_softmax(-1)
    logps = log_probs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logps, entropy.detach(), logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logps_entropy_and_gradient_match_log_softmax(monkeypatch, dtype, temperature):
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 3 * VOCAB)  # chunks of 3 rows, the last one shorter
    generator = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(2, 7, VOCAB, generator=generator)).to(dtype).requires_grad_()
    token_ids = torch.randint(0, VOCAB, (2, 7), generator=generator)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])  # the second row is padded on the right
    weights = torch.randn(2, 7, generator=generator)

    logps, entropy = token_logps_and_entropy(logits, token_ids, temperature=temperature, with_entropy=True)
    (logps * weights * mask).sum().backward()
    ref_logps, ref_entropy, ref_logits = reference(logits, token_ids, temperature)
    (ref_logps * weights * mask).sum().backward()

    assert logps.dtype == entropy.dtype == torch.float32 and logits.grad.dtype == dtype
    assert not entropy.requires_grad
    torch.testing.assert_close(logps.double(), ref_logps.detach(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-5, rtol=1e-6)
    tolerance = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad.to(dtype).double(), **tolerance)
    assert (logits.grad[1, 4:] == 0).all()  # padded positions get no gradient


def test_entropy_is_left_out_when_not_asked():
    logits = torch.randn(1, 3, VOCAB)
    logps, entropy = token_logps_and_entropy(logits, torch.tensor([[1, 2, 3]]))
    assert entropy is None and logps.shape == (1, 3)


def test_completion_logps_score_padded_rows_as_unpadded_ones(hf_models):
    model = hf_models["qwen2"]
    prompt, completion = [5, 9, 13], [4, 8]
    # Row 0 unpadded; row 1: the same sequence with a left-padded prompt and a right-padded completion.
    prompt_ids = torch.tensor([[0] + prompt, [0, 0] + prompt[1:]])
    prompt_mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    completion_ids = torch.tensor([completion + [0], completion[:1] + [0, 0]])
    completion_mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    with torch.no_grad():
        logps, entropy = completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                          temperature=0.8, with_entropy=True)
        expected = (model(torch.tensor([prompt + completion])).logits[0, 2:4] / 0.8).log_softmax(-1)
    torch.testing.assert_close(logps[0, :2], expected[[0, 1], completion], atol=1e-5, rtol=0)
    unpadded = (model(torch.tensor([prompt[1:] + completion[:1]])).logits[0, 1] / 0.8).log_softmax(-1)
    torch.testing.assert_close(logps[1, 0], unpadded[completion[0]], atol=1e-5, rtol=0)
    assert logps.shape == entropy.shape == (2, 3)


def grouped_batch():
    """Two groups (three rows with a left-padded prompt, then two with a full-width one) and a row alone;
    completions of several lengths, right-padded, one of them a single token."""
    generator = torch.Generator().manual_seed(1)
    prompt_ids = torch.tensor([[0, 0, 7, 3, 9]] * 3 + [[4, 8, 15, 16, 23]] * 2 + [[0, 5, 6, 2, 1]])
    completion_mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] * 6, [1] * 2 + [0] * 4,
                                    [1] + [0] * 5])
    completion_ids = torch.randint(1, 60, (6, 6), generator=generator) * completion_mask
    weights = torch.randn(6, 6, generator=generator) * completion_mask
    return prompt_ids, (prompt_ids != 0).long(), completion_ids, completion_mask, weights


def logps_and_gradient(model, batch, rows: list[slice], *, gradient: bool = True):
    """logps and entropies of the batch's rows taken `rows` at a time, and every parameter's gradient."""
    prompt_ids, prompt_mask, completion_ids, completion_mask, weights = [t.to(model.device) for t in batch]
    model.zero_grad()
    with torch.set_grad_enabled(gradient):
        outputs = [completion_logps(model, prompt_ids[r], prompt_mask[r], completion_ids[r], completion_mask[r],
                                    temperature=0.9, with_entropy=True) for r in rows]
    logps = torch.cat([logps for logps, _ in outputs]) * completion_mask
    if gradient:
        (logps * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()} if gradient else {}
    model.zero_grad(set_to_none=True)
    return logps.detach(), torch.cat([entropy for _, entropy in outputs]) * completion_mask, grads


def count_forwards(model) -> list[int]:
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    return forwards


def assert_same_scores(shared, alone) -> None:
    torch.testing.assert_close(shared[0], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared[1], alone[1], atol=1e-5, rtol=0)
    for parameter, gradient in shared[2].items():
        torch.testing.assert_close(gradient, alone[2][parameter], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "llama"])
def test_a_group_shares_one_prompt_forward_with_the_same_logps_and_gradient(hf_models, name):
    model = copy.deepcopy(hf_models[name])
    forwards = count_forwards(model)
    shared = logps_and_gradient(model, grouped_batch(), [slice(0, 6)])
    assert len(forwards) == 2  # the three distinct prompts in one forward, then every row's continuation
    assert_same_scores(shared, logps_and_gradient(model, grouped_batch(), [slice(row, row + 1) for row in range(6)]))


def random_grouped_batch(generator: torch.Generator):
    """1-4 groups of 1-4 rows; prompts of 1-11 real tokens, left-padded; completions of 0-19 tokens."""
    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    width, completion_width = draw(1, 11), draw(2, 19)
    prompt_rows = []
    for _ in range(draw(1, 4)):
        mask = (torch.arange(width) >= width - draw(1, width)).long()
        prompt_rows += [torch.randint(1, VOCAB, (width,), generator=generator) * mask] * draw(1, 4)
    prompt_ids = torch.stack(prompt_rows)
    lengths = torch.randint(0, completion_width + 1, (len(prompt_ids),), generator=generator)
    completion_mask = (torch.arange(completion_width) < lengths[:, None]).long()
    completion_ids = torch.randint(1, VOCAB, completion_mask.shape, generator=generator) * completion_mask
    return prompt_ids, (prompt_ids != 0).long(), completion_ids, completion_mask


@pytest.mark.parametrize("name", ["qwen2", "qwen3", "llama"])
def test_random_packed_batches_score_as_their_rows(hf_models, name):
    plain = hf_models[name]
    packed_model = copy.deepcopy(plain)
    enable_packed_prompts(packed_model)
    generator = torch.Generator().manual_seed(2)
    for _ in range(10):
        prompt_ids, prompt_mask, completion_ids, completion_mask = random_grouped_batch(generator)
        with torch.no_grad():
            packed = completion_logps(packed_model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                      with_entropy=True, share_prompts=True)
            rows = completion_logps(plain, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                    with_entropy=True, share_prompts=False)
        for got, expected in zip(packed, rows):
            torch.testing.assert_close(got * completion_mask, expected * completion_mask, atol=1e-5, rtol=0)

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "llama"])
def test_packed_groups_train_as_their_rows_alone(hf_models, name, device):
    model = copy.deepcopy(hf_models[name]).to(device)
    alone = logps_and_gradient(model, grouped_batch(), [slice(row, row + 1) for row in range(6)])
    assert enable_packed_prompts(model) and packs_prompts(torch.nn.Sequential(model))
    model.train()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    forwards = count_forwards(model)
    packed = logps_and_gradient(model, grouped_batch(), [slice(0, 6)])
    assert len(forwards) == 1  # one forward, its layers recomputed in the backward
    assert_same_scores(packed, alone)


@pytest.mark.parametrize("overrides", [dict(use_sliding_window=True, sliding_window=4, max_window_layers=1), dict()])
def test_models_without_full_sdpa_attention_keep_their_attention(overrides):
    settings = {**tiny_config("qwen2").to_dict(), "layer_types": None, **overrides}  # layer types derived anew
    implementation = "sdpa" if overrides else "eager"
    model = AutoModelForCausalLM.from_config(Qwen2Config(**settings), attn_implementation=implementation)
    assert not enable_packed_prompts(model)
    assert model.config._attn_implementation == implementation


def test_a_checkpointed_model_in_training_runs_the_plain_forward(hf_models):
    model = copy.deepcopy(hf_models["qwen2"]).train()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    prompt_ids = torch.tensor([[7, 3, 9]] * 4)
    completion_ids = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]])
    ones = torch.ones_like(prompt_ids), torch.ones_like(completion_ids)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    logps, _ = completion_logps(model, prompt_ids, ones[0], completion_ids, ones[1])
    logps.sum().backward()  # the layers are recomputed here, which a prompt cache would not survive
    assert len(forwards) == 1
    with torch.no_grad():
        shared, _ = completion_logps(model.eval(), prompt_ids, ones[0], completion_ids, ones[1])
    torch.testing.assert_close(logps.detach(), shared, atol=1e-5, rtol=0)
