"""Attention over the paged KV cache: the interface every backend implements, in PyTorch.

This is the CPU path and the reference the Triton kernels (``kernels/``) are checked against.
Shapes are in docs/architecture.md: caches are ``[num_blocks, block_size, num_kv_heads, head_dim]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write new keys and values ``[T, kv_heads, D]`` into their slots; slot -1 is skipped."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    assert flat_k.shape[0] == k_cache.shape[0] * block_size
    flat_k.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached positions of each sequence: ``[B, length, kv_heads, D]``."""
    num_blocks, block_size = cache.shape[:2]
    needed = -(-length // block_size)
    table = block_tables[:, :needed].clamp(min=0).flatten().long()
    # index_select over whole blocks is a row copy, several times faster than advanced indexing.
    gathered = cache.view(num_blocks, -1).index_select(0, table)
    return gathered.view(block_tables.shape[0], needed * block_size, *cache.shape[2:])[:, :length]


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_q_len: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's last queries over its whole cached sequence."""
    out = torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    lengths = seq_lens.tolist()
    for i, seq_len in enumerate(lengths):
        q_seq = q[starts[i] : starts[i + 1]]
        q_len = q_seq.shape[0]
        keys = gather_kv(k_cache, block_tables[i : i + 1], seq_len)[0]
        values = gather_kv(v_cache, block_tables[i : i + 1], seq_len)[0]
        query_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]
        out[starts[i] : starts[i + 1]] = _sdpa(q_seq[None], keys[None], values[None], mask[None, None], scale)[0]
    return out


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """One query per sequence, at its last position, over all its cached positions."""
    max_len = max_seq_len or int(seq_lens.max())
    keys = gather_kv(k_cache, block_tables, max_len)
    values = gather_kv(v_cache, block_tables, max_len)
    mask = torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None].to(q.device)
    return _sdpa(q[:, None], keys, values, mask[:, None, None, :], scale)[:, 0]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """``q`` ``[B, Lq, H, D]``, ``k``/``v`` ``[B, Lk, KVH, D]`` → ``[B, Lq, H, D]``."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2).to(q.dtype),
        v.transpose(1, 2).to(q.dtype),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)
