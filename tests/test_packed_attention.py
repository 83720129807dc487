"""The packed attention's two ways (one variable-length flash call; two sdpa calls with a mask) agree."""

import pytest
import torch
from torch import nn

from flywheel.trainer import prompt_packing
from flywheel.trainer.prompt_packing import PackedLayout

HEADS, KEY_HEADS, DIM = 4, 2, 8


def segment_attention(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                      enable_gqa=False, is_causal=False):
    """varlen_attn written out: each segment's queries against its keys, causal from the segment's end."""
    assert window_size == (-1, 0) or is_causal
    outputs = []
    for start_q, end_q, start_k, end_k in zip(cu_seq_q[:-1], cu_seq_q[1:], cu_seq_k[:-1], cu_seq_k[1:]):
        queries, keys = int(end_q - start_q), int(end_k - start_k)
        assert queries <= max_q and keys <= max_k
        visible = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
        outputs.append(nn.functional.scaled_dot_product_attention(
            query[start_q:end_q].transpose(0, 1), key[start_k:end_k].transpose(0, 1),
            value[start_k:end_k].transpose(0, 1), attn_mask=visible, scale=scale, enable_gqa=True).transpose(0, 1))
    return torch.cat(outputs)


class Attention(nn.Module):
    num_key_value_groups = HEADS // KEY_HEADS
    is_causal = True


def random_layout(generator: torch.Generator, device: str) -> tuple[PackedLayout, int]:
    """1-4 groups, prompts of 0-P tokens, 1-4 rows each, rows W wide; and the packed length."""
    groups, prompt_width, width = (int(torch.randint(low, high, (1,), generator=generator))
                                   for low, high in [(1, 5), (1, 9), (1, 12)])
    prompt_lengths = torch.randint(0, prompt_width + 1, (groups,), generator=generator)
    prompt_of_row = torch.arange(groups).repeat_interleave(torch.randint(1, 5, (groups,), generator=generator))
    layout = PackedLayout.build(prompt_lengths.to(device), prompt_width, prompt_of_row.to(device), width)
    return layout, groups * prompt_width + len(prompt_of_row) * width


def attention_and_gradients(attend, query, key, value, scored):
    """The output at the scored positions, and the inputs' gradients of a loss over those."""
    query, key, value = (t.detach().requires_grad_() for t in (query, key, value))
    output = attend(query, key, value)
    output.backward((1 + output.detach()) * scored[None, :, None, None])
    return output.detach()[0, scored], query.grad, key.grad, value.grad


def compare(layout: PackedLayout, tokens: int, device: str, dtype: torch.dtype, scale: float, atol: float,
            seed: int) -> None:
    """The varlen way against the masked one, at the positions that are scored (not a prompt's padding,
    whose own outputs differ and are never read), with the gradients of a loss over those."""
    groups, prompt_width, rows, width = layout.shape
    scored = torch.cat([layout.prompt_keys.reshape(-1), torch.ones(rows * width, dtype=torch.bool, device=device)])
    generator = torch.Generator(device).manual_seed(seed)
    query = torch.randn(1, HEADS, tokens, DIM, device=device, dtype=dtype, generator=generator)
    key, value = (torch.randn(1, KEY_HEADS, tokens, DIM, device=device, dtype=dtype, generator=generator)
                  for _ in range(2))
    varlen = attention_and_gradients(lambda q, k, v: prompt_packing._varlen_attention(q, k, v, layout, scale),
                                     query, key, value, scored)
    masked = attention_and_gradients(
        lambda q, k, v: prompt_packing._masked_attention(Attention(), q.float(), k.float(), v.float(), layout,
                                                         scale, 0.0).to(dtype), query, key, value, scored)
    for got, expected in zip(varlen, masked):
        torch.testing.assert_close(got, expected, atol=atol, rtol=atol)


def test_the_varlen_layout_attends_as_the_masked_rows(monkeypatch):
    monkeypatch.setattr(prompt_packing, "varlen_attn", segment_attention)
    generator = torch.Generator().manual_seed(0)
    for seed in range(20):
        layout, tokens = random_layout(generator, "cpu")
        compare(layout, tokens, "cpu", torch.float32, 0.3, 1e-5, seed)


@pytest.mark.gpu
def test_flash_varlen_attends_as_the_masked_rows():
    scale = DIM**-0.5  # the models' own
    assert prompt_packing._runs_flash_varlen(torch.empty(1, HEADS, 1, DIM, device="cuda", dtype=torch.bfloat16), scale)
    generator = torch.Generator().manual_seed(0)
    for seed in range(20):
        layout, tokens = random_layout(generator, "cuda")
        compare(layout, tokens, "cuda", torch.bfloat16, scale, 2e-2, seed)
