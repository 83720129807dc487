"""The Triton kernels equal the PyTorch reference on random paged layouts (GPU only)."""

from __future__ import annotations

import math

import pytest
import torch

from flywheel.engine import attention

pytest.importorskip("triton")
from flywheel.engine import kernels  # noqa: E402

# The CPU only runs these under TRITON_INTERPRET=1 (conftest skips them there otherwise).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# (heads, kv_heads, head_dim): GQA ratios 7 (qwen2.5-0.5b), 2 (qwen3-0.6b) and 1.
HEAD_SHAPES = [(14, 2, 64), (16, 8, 128), (4, 4, 64)]


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "output has NaN: unwritten elements or a read of a poisoned cache slot"
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), ref.double(), atol=tol, rtol=tol)
    rel = (out.double() - ref.double()).norm() / ref.double().norm()
    assert rel < tol / 2, f"relative error {rel:.2e}"


def paged_layout(seq_lens: list[int], block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype, gen):
    """Random caches and shuffled block tables for ``seq_lens``.

    Returns ``(k_ref, v_ref, k_kernel, v_kernel, block_tables)``: the kernel's copies hold NaN in every
    slot no sequence owns (spare blocks and the tails of last blocks), so a stray read shows.
    """
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 5
    order = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.full((len(seq_lens), max(blocks_per_seq) + 2), -1, dtype=torch.int32)
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for i, (n, used) in enumerate(zip(seq_lens, blocks_per_seq)):
        ids = [order.pop() for _ in range(used)]
        table[i, :used] = torch.tensor(ids, dtype=torch.int32)
        owned.view(-1)[torch.tensor([ids[p // block_size] * block_size + p % block_size for p in range(n)])] = True
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_ref = torch.randn(shape, generator=gen).to(dtype)
    v_ref = torch.randn(shape, generator=gen).to(dtype)
    k_kernel, v_kernel = k_ref.clone(), v_ref.clone()
    k_kernel[~owned] = float("nan")
    v_kernel[~owned] = float("nan")
    on = lambda t: t.to(DEVICE)  # noqa: E731
    return on(k_ref), on(v_ref), on(k_kernel), on(v_kernel), on(table)


def poisoned_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads,kv_heads,head_dim", HEAD_SHAPES)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_attention_matches_reference(dtype, block_size, heads, kv_heads, head_dim, num_splits):
    gen = torch.Generator().manual_seed(hash((str(dtype), block_size, heads, num_splits)) % 2**31)
    seq_lens = [1, 17, 333, 64, 129, 5, 250, 31]
    k_ref, v_ref, k_cache, v_cache, block_tables = paged_layout(seq_lens, block_size, kv_heads, head_dim, dtype, gen)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = 1 / math.sqrt(head_dim)

    out = kernels.decode_attention(
        q, k_cache, v_cache, lens, block_tables, scale, num_splits=num_splits, out=poisoned_like(q)
    )

    ref = attention.decode_attention(q.double(), k_ref.double(), v_ref.double(), lens, block_tables, scale)
    assert_matches(out, ref, dtype)


@pytest.mark.gpu
def test_decode_attention_max_seq_len_and_wide_table():
    """A block table wider than any sequence, narrowed by ``max_seq_len``; many splits, some empty."""
    gen = torch.Generator().manual_seed(7)
    seq_lens = [200, 3, 97]
    k_ref, v_ref, k_cache, v_cache, block_tables = paged_layout(seq_lens, 16, 2, 64, torch.float32, gen)
    wide = torch.full((3, 64), -1, dtype=torch.int32, device=DEVICE)
    wide[:, : block_tables.shape[1]] = block_tables
    q = torch.randn(3, 14, 64, generator=gen).to(DEVICE)
    lens = torch.tensor(seq_lens, device=DEVICE)

    for kwargs in ({"num_splits": 8}, {"max_seq_len": 200, "num_splits": 5}, {"max_seq_len": 200}):
        out = kernels.decode_attention(q, k_cache, v_cache, lens, wide, 0.125, out=poisoned_like(q), **kwargs)
        ref = attention.decode_attention(q.double(), k_ref.double(), v_ref.double(), lens, block_tables, 0.125)
        assert_matches(out, ref, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("heads,kv_heads,head_dim", HEAD_SHAPES)
@pytest.mark.parametrize("cached_prefix", [False, True])
def test_prefill_attention_matches_reference(dtype, block_size, heads, kv_heads, head_dim, cached_prefix):
    gen = torch.Generator().manual_seed(hash((str(dtype), block_size, heads, cached_prefix)) % 2**31)
    q_lens = [1, 70, 129, 13, 64]
    prefixes = [0, 5, 48, 100, 33] if cached_prefix else [0] * len(q_lens)
    seq_lens = [p + n for p, n in zip(prefixes, q_lens)]
    k_ref, v_ref, k_cache, v_cache, block_tables = paged_layout(seq_lens, block_size, kv_heads, head_dim, dtype, gen)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    cu_seqlens_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = 1 / math.sqrt(head_dim)

    for max_q_len in (max(q_lens), None):
        out = kernels.prefill_attention(
            q, k_cache, v_cache, cu_seqlens_q, lens, block_tables, scale, max_q_len=max_q_len, out=poisoned_like(q)
        )
        ref = attention.prefill_attention(
            q.double(), k_ref.double(), v_ref.double(), cu_seqlens_q, lens, block_tables, scale
        )
        assert_matches(out, ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
def test_store_kv_writes_the_reference_slots(dtype, block_size):
    gen = torch.Generator().manual_seed(block_size)
    kv_heads, head_dim, tokens, num_blocks = 8, 128, 45, 9
    qkv = torch.randn(tokens, (16 + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(DEVICE)
    k = qkv[:, 16 * head_dim : (16 + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)  # strided views
    v = qkv[:, (16 + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::7] = -1
    slot_mapping = slots.to(DEVICE)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()

    kernels.store_kv(k, v, k_cache, v_cache, slot_mapping)

    attention.store_kv(k, v, k_ref, v_ref, slot_mapping)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert not torch.equal(k_cache, v_cache)


def reserve_poisoned(*like: torch.Tensor) -> None:
    """Fill freed allocator blocks the size of the coming outputs with NaN, so unwritten outputs show."""
    for x in [torch.full_like(x, float("nan")) for x in like]:
        del x


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("hidden", [64, 896, 3584])
def test_rms_norms_match_formula(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(37, hidden, generator=gen).to(dtype).to(DEVICE)
    residual = torch.randn(37, hidden, generator=gen).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)

    reserve_poisoned(x)
    normed = kernels.rms_norm(x, weight, 1e-6)
    assert_matches(normed, rms_norm_reference(x, weight, 1e-6), dtype)

    reserve_poisoned(x, x)
    fused, new_residual = kernels.fused_add_rms_norm(x, residual, weight, 1e-6)
    summed = (x.double() + residual.double()).to(dtype)
    assert torch.equal(new_residual, summed)
    assert_matches(fused, rms_norm_reference(summed, weight, 1e-6), dtype)

    heads = x.view(37, -1, 32)  # per-head norm (Qwen3's q/k norm)
    head_weight = weight[:32]
    reserve_poisoned(heads)
    assert_matches(kernels.rms_norm(heads, head_weight, 1e-6), rms_norm_reference(heads, head_weight, 1e-6), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_silu_and_mul_matches_formula(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 11, 2 * 4864, generator=gen).to(dtype).to(DEVICE)
    reserve_poisoned(x[..., :4864])
    out = kernels.silu_and_mul(x)
    gate, up = x.double().chunk(2, dim=-1)
    assert out.shape == (3, 11, 4864)
    assert_matches(out, torch.nn.functional.silu(gate) * up, dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim", HEAD_SHAPES)
@pytest.mark.parametrize("table", ["cos_sin_cache", "cos_and_sin"])
def test_rotary_embedding_matches_hf_rotate_half(dtype, heads, kv_heads, head_dim, table):
    gen = torch.Generator().manual_seed(heads)
    tokens, max_position = 23, 4096
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(DEVICE)
    q = qkv[:, : heads * head_dim]  # [T, heads*D] strided views, rotated in place
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    positions = torch.randint(0, max_position, (tokens,), generator=gen).to(DEVICE)
    q_before, k_before = q.double().view(tokens, heads, head_dim), k.double()
    cos_sin = kernels.rope_cos_sin_cache(head_dim, max_position, 1_000_000.0, device=DEVICE)
    if table == "cos_and_sin":  # separate [max_position, D/2] tables, as layers.RotaryEmbedding keeps them
        cos_sin = tuple(part.contiguous() for part in cos_sin.chunk(2, dim=-1))

    q_out, k_out = kernels.rotary_embedding(positions, q, k, cos_sin, head_dim)

    inv_freq = 1.0 / (1_000_000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = positions.cpu().double()[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1).to(DEVICE)[:, None, :]
    cos, sin = emb.cos(), emb.sin()
    assert q_out is q and k_out is k
    assert_matches(q.view(tokens, heads, head_dim), q_before * cos + rotate_half(q_before) * sin, dtype)
    assert_matches(k, k_before * cos + rotate_half(k_before) * sin, dtype)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [1000, 151936])
def test_draw_tokens_greedy_rows_and_logprobs(dtype, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = (3 * torch.randn(6, vocab, generator=gen)).to(dtype).to(DEVICE)
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.0, 2.0, 0.0], device=DEVICE)
    ids, logprobs = kernels.draw_tokens(logits, temperature, step_seed=3)
    ids = ids.long()
    greedy = temperature == 0
    assert torch.equal(ids[greedy], logits.float().argmax(-1)[greedy])
    scale = torch.where(greedy, torch.ones_like(temperature), temperature)
    expected = torch.log_softmax(logits.float() / scale[:, None], -1).gather(1, ids[:, None])[:, 0]
    torch.testing.assert_close(logprobs.float(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,vocab", [(3, 1000), (512, 151936)])
def test_draw_tokens_ranks_count_the_larger_logits(dtype, rows, vocab):
    gen = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, vocab, generator=gen).to(dtype).to(DEVICE)
    temperature = torch.rand(rows, generator=gen).add(0.5).to(DEVICE)
    temperature[0] = 0.0
    ids, logprobs, ranks = kernels.draw_tokens(logits, temperature, step_seed=5, with_ranks=True)
    plain_ids, plain_logprobs = kernels.draw_tokens(logits, temperature, step_seed=5)
    assert torch.equal(ids, plain_ids) and torch.equal(logprobs, plain_logprobs)
    expected = (logits > logits.gather(1, ids.long()[:, None])).sum(-1) + 1
    assert torch.equal(ranks.long(), expected)
    assert int(ranks[0]) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_draw_tokens_follows_the_tempered_softmax(temperature):
    from scipy.stats import chisquare

    draws = 20000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.3, 0.8, 1.2, -2.0, 0.1], device=DEVICE)
    ids = kernels.draw_tokens(logits.repeat(draws, 1), torch.full((draws,), temperature, device=DEVICE), 11)[0]
    counts = torch.bincount(ids.long().cpu(), minlength=12).double()
    expected = (logits.cpu().double() / temperature).softmax(-1) * draws
    assert chisquare(counts, expected).pvalue > 1e-3


@pytest.mark.gpu
def test_draw_tokens_row_seed_decides_the_draw_and_masked_tokens_never_win():
    logits = torch.zeros(64, 500, device=DEVICE)
    logits[:, 250:] = float("-inf")
    seeds = torch.full((64,), -1, dtype=torch.long, device=DEVICE)
    seeds[[5, 40]] = 1234
    ones = torch.ones(64, device=DEVICE)
    first = kernels.draw_tokens(logits, ones, step_seed=1, row_seeds=seeds)[0].long()
    second = kernels.draw_tokens(logits, ones, step_seed=2, row_seeds=seeds)[0].long()
    assert first[5] == first[40] == second[5] == second[40]
    assert not torch.equal(first, second)
    assert int(first.max()) < 250 and int(second.max()) < 250
