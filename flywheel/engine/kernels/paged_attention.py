"""Attention over the paged KV cache in Triton: split-KV decode and causal prefill with a cached prefix.

Same contracts as ``flywheel.engine.attention`` (the PyTorch reference): caches are
``[num_blocks, block_size, num_kv_heads, head_dim]``, ``block_tables`` is ``[B, max_blocks]`` int32
padded with -1 (or 0). Nothing here reads a device value on the host, so decode can be captured in a
CUDA graph: its grid depends only on the batch size and the block-table width.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
# A finite start for running maxima: rows that see no key keep it and get weight 0, never NaN.
_NEG_START = tl.constexpr(-1.0e30)
# Decode splits a sequence only while the batch leaves the GPU's multiprocessors idle.
_DECODE_PROGRAMS_PER_SM = 2
_MIN_SPLIT_TOKENS = 128
_MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, seq_lens_ptr, block_tables_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ob, stride_oh,
    num_heads, split_tokens,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, KV_PER_PROGRAM: tl.constexpr, TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Tensors are [kv head, query row, ...]: one program serves KV_PER_PROGRAM adjacent kv heads and
    # all their query heads, reading each cache row once, with the heads of one token side by side.
    seq = tl.program_id(0)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    start = split * split_tokens
    if start >= seq_len:
        return
    end = tl.minimum(start + split_tokens, seq_len)

    kv_heads = tl.program_id(1) * KV_PER_PROGRAM + tl.arange(0, KV_PER_PROGRAM)
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, BLOCK_D)
    heads = kv_heads[:, None] * GROUP + rows[None, :]
    head_mask = (rows < GROUP)[None, :, None] & (dims < HEAD_DIM)[None, None, :]
    q = tl.load(q_ptr + seq * stride_qb + heads[:, :, None] * stride_qh + dims[None, None, :], mask=head_mask, other=0.0)

    m_i = tl.full([KV_PER_PROGRAM, GROUP_PAD], _NEG_START, tl.float32)
    l_i = tl.zeros([KV_PER_PROGRAM, GROUP_PAD], tl.float32)
    acc = tl.zeros([KV_PER_PROGRAM, GROUP_PAD, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    for tile_start in range(start, end, TILE_N):
        tokens = tile_start + tl.arange(0, TILE_N)
        tok_ok = tokens < end
        block = tl.load(table + tokens // BLOCK_SIZE, mask=tok_ok, other=0).to(tl.int64)
        slot = tokens % BLOCK_SIZE
        kv_mask = tok_ok[None, :, None] & (dims < HEAD_DIM)[None, None, :]
        k = tl.load(
            k_cache_ptr + block[None, :, None] * stride_kb + slot[None, :, None] * stride_ks
            + kv_heads[:, None, None] * stride_kh + dims[None, None, :],
            mask=kv_mask, other=0.0,
        )
        v = tl.load(
            v_cache_ptr + block[None, :, None] * stride_vb + slot[None, :, None] * stride_vs
            + kv_heads[:, None, None] * stride_vh + dims[None, None, :],
            mask=kv_mask, other=0.0,
        )
        scores = tl.dot(q, tl.permute(k.to(q.dtype), (0, 2, 1)), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(tok_ok[None, None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 2))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, :, None])
        l_i = l_i * alpha + tl.sum(p, 2)
        acc = acc * alpha[:, :, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, :, None]
    if NUM_SPLITS == 1:
        out_ptrs = out_ptr + seq * stride_ob + heads[:, :, None] * stride_oh + dims[None, None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_mask)
    else:
        # part_out [B, H, NUM_SPLITS, BLOCK_D] and part_lse [B, H, NUM_SPLITS], fp32, contiguous.
        part = (seq * num_heads + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, :, None] * BLOCK_D + dims[None, None, :], out, mask=head_mask)
        tl.store(part_lse_ptr + part, m_i + tl.log2(l_i), mask=(rows < GROUP)[None, :])


@triton.jit
def _decode_reduce_kernel(
    seq_lens_ptr, part_out_ptr, part_lse_ptr, out_ptr,
    stride_ob, stride_oh,
    split_tokens,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    used = tl.cdiv(seq_len, split_tokens)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, BLOCK_D)
    split_ok = splits < used
    part = (seq * tl.num_programs(1) + head) * NUM_SPLITS + splits
    lse = tl.load(part_lse_ptr + part, mask=split_ok, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    weight = tl.where(split_ok, weight, 0.0)
    parts = tl.load(part_out_ptr + part[:, None] * BLOCK_D + dims[None, :], mask=split_ok[:, None], other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, cu_seqlens_q_ptr, seq_lens_ptr, block_tables_ptr, out_ptr,
    qk_scale,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    q_tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_begin = tl.load(cu_seqlens_q_ptr + seq).to(tl.int32)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1).to(tl.int32) - q_begin
    first = q_tile * BLOCK_M
    if first >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    prefix = seq_len - q_len
    kv_head = head // GROUP

    rows = first + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    dim_ok = dims < HEAD_DIM
    io_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(
        q_ptr + (q_begin + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=io_mask, other=0.0
    )
    positions = prefix + rows

    m_i = tl.full([BLOCK_M], _NEG_START, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    kv_end = tl.minimum(seq_len, prefix + first + BLOCK_M)
    for tile_start in range(0, kv_end, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        tok_ok = tokens < kv_end
        block = tl.load(table + tokens // BLOCK_SIZE, mask=tok_ok, other=0).to(tl.int64)
        slot = tokens % BLOCK_SIZE
        kv_mask = tok_ok[:, None] & dim_ok[None, :]
        k = tl.load(
            k_cache_ptr + block[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh + dims[None, :],
            mask=kv_mask, other=0.0,
        )
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale
        visible = tok_ok[None, :] & (tokens[None, :] <= positions[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh + dims[None, :],
            mask=kv_mask, other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + (q_begin + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :],
        out.to(out_ptr.dtype.element_ty), mask=io_mask,
    )


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_num_splits(
    batch: int,
    num_kv_heads: int,
    head_dim: int,
    max_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> int:
    """How many KV chunks decode splits each sequence into: enough programs to fill the GPU, no more.

    Depends only on shapes (never on device values), so one CUDA graph per batch size stays valid.
    """
    if device.type != "cuda":
        return 1
    programs = batch * num_kv_heads // _decode_kv_heads_per_program(num_kv_heads, head_dim, dtype)
    wanted = triton.cdiv(_DECODE_PROGRAMS_PER_SM * _multiprocessor_count(device.index or 0), programs)
    possible = max(1, max_blocks * block_size // _MIN_SPLIT_TOKENS)
    return max(1, min(wanted, possible, _MAX_SPLITS))


def _check_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor) -> None:
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(
            f"k_cache and v_cache must both be [num_blocks, block_size, kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    heads, head_dim = q.shape[1], q.shape[2]
    if head_dim != k_cache.shape[3] or heads % k_cache.shape[2] != 0:
        raise ValueError(
            f"q [*, heads={heads}, head_dim={head_dim}] does not fit a cache of {k_cache.shape[2]} kv heads "
            f"of head_dim {k_cache.shape[3]}: heads must be a multiple of kv heads and head_dim must match"
        )
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last (head_dim) dimension")
    if block_tables.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_tables must be int32 (or int64), got {block_tables.dtype}")


def _output(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(
            f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dimension, "
            f"got {tuple(out.shape)} {out.dtype}"
        )
    return out


def _decode_launch_config(dtype: torch.dtype) -> tuple[int, int, int]:
    """Tokens per loop step, warps and pipeline stages of the decode kernel (bench/notes_kernels.md)."""
    return (32, 4, 2) if dtype == torch.float32 else (32, 2, 2)


def _decode_kv_heads_per_program(kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Adjacent kv heads one decode program reads together: a token's heads up to 256 values wide
    (128 in fp32, whose tiles take twice the registers)."""
    width = 128 if dtype == torch.float32 else 256
    per_program = 1
    while kv_heads % (2 * per_program) == 0 and 2 * per_program * head_dim <= width:
        per_program *= 2
    return per_program


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products; Triton would otherwise round them to tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence (``q`` ``[B, heads, D]``) over its ``seq_lens[i]`` cached positions.

    ``max_seq_len`` (an upper bound on ``seq_lens``, when the caller knows it) narrows the split grid;
    ``num_splits`` overrides the split count (tests and benchmarks). Writes into ``out`` when given
    (e.g. a CUDA graph's static buffer). Returns ``[B, heads, D]``.
    """
    _check_paged(q, k_cache, v_cache, block_tables)
    batch, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    max_blocks = block_tables.shape[1]
    if max_seq_len is not None:
        max_blocks = min(max_blocks, triton.cdiv(max_seq_len, block_size))
    if num_splits is None:
        num_splits = decode_num_splits(batch, kv_heads, head_dim, max_blocks, block_size, q.dtype, q.device)
    group = heads // kv_heads
    tile_n, num_warps, num_stages = _decode_launch_config(q.dtype)
    kv_per_program = _decode_kv_heads_per_program(kv_heads, head_dim, q.dtype)
    # Whole tiles per split, so only a sequence's last tile is partly masked.
    split_tokens = triton.cdiv(triton.cdiv(max(max_blocks, 1) * block_size, num_splits), tile_n) * tile_n
    block_d = triton.next_power_of_2(head_dim)
    out = _output(q, out)
    if batch == 0:
        return out
    part_out = part_lse = out  # unused when there is one split
    if num_splits > 1:
        part_out = torch.empty((batch, heads, num_splits, block_d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, heads, num_splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(batch, kv_heads // kv_per_program, num_splits)](
        q, k_cache, v_cache, seq_lens, block_tables, out, part_out, part_lse,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        heads, split_tokens,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), KV_PER_PROGRAM=kv_per_program, TILE_N=tile_n,
        NUM_SPLITS=num_splits, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, heads)](
            seq_lens, part_out, part_lse, out,
            out.stride(0), out.stride(1),
            split_tokens,
            HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits,
            SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
            num_warps=1 if block_d <= 64 else 2,
        )
    return out


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_q_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's last queries (``q`` ``[T, heads, D]`` packed) over its cache.

    Sequence ``i`` owns ``q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]``, its last positions of ``seq_lens[i]``.
    ``max_q_len`` (the longest query run, when the caller knows it) sizes the grid; without it the grid
    covers ``T`` queries per sequence and the surplus programs exit at once. Writes into ``out`` when
    given. Returns ``[T, heads, D]``.
    """
    _check_paged(q, k_cache, v_cache, block_tables)
    total, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    batch = seq_lens.shape[0]
    out = _output(q, out)
    if total == 0 or batch == 0:
        return out
    if q.dtype == torch.float32:
        block_m, block_n, num_warps = 32, 32, 4
    else:
        block_m, block_n, num_warps = 64, 64, 4
    q_tiles = triton.cdiv(max_q_len if max_q_len is not None else total, block_m)
    _prefill_kernel[(q_tiles, batch, heads)](
        q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, out,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
        GROUP=heads // kv_heads, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps,
    )
    return out
