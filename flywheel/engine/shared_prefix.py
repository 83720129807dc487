"""Decode attention that reads a shared prefix once for all the sequences that share it.

The ``n`` completions of a prompt share its full cache blocks. Plain paged decode reads those
blocks once per completion; here each group's queries attend to the shared blocks together (one
matrix product), every sequence attends to its own blocks alone, and the two partial results are
merged by their log-sum-exp. This is the CPU path's decode (memory traffic is its bottleneck).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flywheel.engine.attention import gather_kv


@dataclass
class SharedPrefixLayout:
    """Which decode rows share which leading blocks (groups padded to one size), and what each row
    has on its own."""

    group_rows: torch.Tensor  # [G, M]: the rows of each group, padded by repeating its first row
    group_row_valid: torch.Tensor  # [G, M] bool
    group_blocks: torch.Tensor  # [G, S]: each group's shared blocks, padded with -1
    group_lens: torch.Tensor  # [G]: shared tokens
    private_block_tables: torch.Tensor  # [B, P]: each row's blocks after its shared ones
    private_lens: torch.Tensor  # [B]: cached tokens in those blocks

    @classmethod
    def from_block_tables(
        cls, block_tables: list[list[int]], seq_lens: list[int], block_size: int
    ) -> SharedPrefixLayout | None:
        """The layout, or None when no two rows share a block."""
        by_first_block: dict[int, list[int]] = {}
        for row, table in enumerate(block_tables):
            if len(table) > 1:
                by_first_block.setdefault(table[0], []).append(row)
        shared = [0] * len(block_tables)
        groups = []
        for rows in by_first_block.values():
            if len(rows) < 2:
                continue
            tables = [block_tables[row] for row in rows]
            # A decoding row's last block is its own (copy-on-write), so shared blocks are full.
            limit = min(len(t) for t in tables) - 1
            common = 0
            for column in zip(*tables):
                if common == limit or len(set(column)) > 1:
                    break
                common += 1
            if common:
                groups.append((rows, tables[0][:common]))
                for row in rows:
                    shared[row] = common
        if not groups:
            return None
        most_rows = max(len(rows) for rows, _ in groups)
        most_blocks = max(len(blocks) for _, blocks in groups)
        width = max(len(t) - s for t, s in zip(block_tables, shared))
        return cls(
            group_rows=torch.tensor([rows + rows[:1] * (most_rows - len(rows)) for rows, _ in groups]),
            group_row_valid=torch.tensor([[i < len(rows) for i in range(most_rows)] for rows, _ in groups]),
            group_blocks=torch.tensor([b + [-1] * (most_blocks - len(b)) for _, b in groups], dtype=torch.int32),
            group_lens=torch.tensor([len(b) * block_size for _, b in groups]),
            private_block_tables=torch.tensor(
                [t[s:] + [-1] * (width - len(t) + s) for t, s in zip(block_tables, shared)], dtype=torch.int32
            ),
            private_lens=torch.tensor([n - s * block_size for n, s in zip(seq_lens, shared)]),
        )


def _attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, scale: float):
    """``q`` ``[B, KVH, G, D]``, ``k``/``v`` ``[B, L, KVH, D]`` (first ``lengths[b]`` positions valid)
    → output ``[B, KVH, G, D]`` and log-sum-exp ``[B, KVH, G]``."""
    k, v = k.to(q.dtype), v.to(q.dtype)
    masked = torch.arange(k.shape[1])[None, None, :] >= lengths[:, None, None]
    outputs, lses = [], []
    # One kv head at a time: its keys are a strided matrix the matrix product reads in place,
    # where a transpose of all heads would be copied first.
    for head in range(k.shape[2]):
        scores = torch.bmm(q[:, head], k[:, :, head].transpose(1, 2)).mul_(scale).masked_fill_(masked, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        outputs.append(torch.bmm(scores.sub_(lse[..., None]).exp_(), v[:, :, head]))
        lses.append(lse)
    return torch.stack(outputs, dim=1), torch.stack(lses, dim=1)


def _attend_paged(q, k_cache, v_cache, block_tables, lengths, scale):
    longest = int(lengths.max())
    keys, values = gather_kv(k_cache, block_tables, longest), gather_kv(v_cache, block_tables, longest)
    return _attend_with_lse(q, keys, values, lengths, scale)


def decode_attention_shared_prefix(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: SharedPrefixLayout, scale: float
) -> torch.Tensor:
    """One query per sequence (``q`` ``[B, heads, D]``) over its cache, shared prefixes read once."""
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group_size = heads // kv_heads
    grouped_q = q.view(batch, kv_heads, group_size, head_dim)
    out, lse = _attend_paged(grouped_q, k_cache, v_cache, layout.private_block_tables, layout.private_lens, scale)

    # Every query of a group, per kv head, against that group's shared keys: one product per group.
    num_groups, most_rows = layout.group_rows.shape
    group_q = grouped_q[layout.group_rows]  # [G, M, KVH, g, D]
    group_q = group_q.permute(0, 2, 1, 3, 4).reshape(num_groups, kv_heads, most_rows * group_size, head_dim)
    shared_out, shared_lse = _attend_paged(group_q, k_cache, v_cache, layout.group_blocks, layout.group_lens, scale)
    shared_out = shared_out.view(num_groups, kv_heads, most_rows, group_size, head_dim).transpose(1, 2)
    shared_lse = shared_lse.view(num_groups, kv_heads, most_rows, group_size).transpose(1, 2)

    valid = layout.group_row_valid
    rows = layout.group_rows[valid]
    shared_out, shared_lse = shared_out[valid], shared_lse[valid]
    own_out, own_lse = out[rows], lse[rows]
    total = torch.logaddexp(own_lse, shared_lse)
    out[rows] = own_out * torch.exp(own_lse - total)[..., None] + shared_out * torch.exp(shared_lse - total)[..., None]
    return out.view(batch, heads, head_dim)
