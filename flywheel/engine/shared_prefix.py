"""Decode attention that reads a shared prefix once for all the sequences that share it.

The ``n`` completions of a prompt share its full cache blocks. Each group's queries meet the shared
keys in one matrix product, every sequence's queries meet its own keys, and both sets of scores go
through one softmax. The values are then summed straight out of the paged cache by
``embedding_bag`` (a gather fused with the weighted sum), so no copy of them is made. The layout is
built once per step and serves every layer. This is the CPU path's decode (memory traffic is its
bottleneck).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class SharedPrefixLayout:
    """Which decode rows share which leading blocks (groups padded to one size), what each row has
    on its own, and where each score column's value lives in the cache."""

    group_rows: torch.Tensor  # [G, M]: the rows of each group, padded by repeating its first row
    group_blocks: torch.Tensor  # [G, S]: each group's shared blocks, padded with 0 (masked)
    row_group: torch.Tensor  # [B]: each row's group (0 for a row in none)
    row_member: torch.Tensor  # [B]: each row's place in its group
    row_in_group: torch.Tensor  # [B]: 1.0 for a row in a group, else 0.0
    private_blocks: torch.Tensor  # [B, P]: each row's blocks after its shared ones, padded with 0 (masked)
    # [B, (S + P) * block_size]: 0 for the shared, then the private, positions a row attends to; -inf elsewhere.
    column_bias: torch.Tensor
    private_slots: torch.Tensor  # [B, P * block_size]: the cache slot of each private position
    _value_rows: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

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
        row_group, row_member = [0] * len(block_tables), [0] * len(block_tables)
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
                for member, row in enumerate(rows):
                    shared[row] = common
                    row_group[row], row_member[row] = len(groups), member
                groups.append((rows, tables[0][:common]))
        if not groups:
            return None
        most_rows = max(len(rows) for rows, _ in groups)
        most_blocks = max(len(blocks) for _, blocks in groups)
        width = max(len(t) - s for t, s in zip(block_tables, shared))
        group_blocks = torch.tensor([b + [0] * (most_blocks - len(b)) for _, b in groups])
        private_blocks = torch.tensor([t[s:] + [0] * (width - len(t) + s) for t, s in zip(block_tables, shared)])
        private_lens = torch.tensor([n - s * block_size for n, s in zip(seq_lens, shared)])
        shared_lens = torch.tensor(shared) * block_size
        visible = torch.cat(
            [
                torch.arange(most_blocks * block_size)[None, :] < shared_lens[:, None],
                torch.arange(width * block_size)[None, :] < private_lens[:, None],
            ],
            dim=1,
        )
        return cls(
            group_rows=torch.tensor([rows + rows[:1] * (most_rows - len(rows)) for rows, _ in groups]),
            group_blocks=group_blocks,
            row_group=torch.tensor(row_group),
            row_member=torch.tensor(row_member),
            row_in_group=(shared_lens > 0).float(),
            private_blocks=private_blocks,
            column_bias=torch.zeros(visible.shape).masked_fill_(~visible, float("-inf")),
            private_slots=(private_blocks[:, :, None] * block_size + torch.arange(block_size)).flatten(1),
        )

    def value_rows(self, kv_heads: int, group_size: int) -> torch.Tensor:
        """``[B * heads, P * block_size]``: each query's private rows of the value cache viewed as
        ``[slots * kv_heads, D]``."""
        key = (kv_heads, group_size)
        if key not in self._value_rows:
            rows = self.private_slots[:, None, :] * kv_heads + torch.arange(kv_heads)[None, :, None]
            batch, columns = self.private_slots.shape
            self._value_rows[key] = rows[:, :, None, :].expand(batch, kv_heads, group_size, columns).reshape(-1, columns)
        return self._value_rows[key]


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``cache`` rows of ``blocks`` ``[R, N]`` as ``[R, N * block_size, kv_heads, D]`` (one row copy per block)."""
    num_blocks, block_size = cache.shape[:2]
    gathered = cache.view(num_blocks, -1).index_select(0, blocks.flatten())
    return gathered.view(blocks.shape[0], blocks.shape[1] * block_size, *cache.shape[2:])


def _per_kv_head(products, q: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """``products(q[:, h], cached[:, :, h])`` for every kv head ``h``, stacked on dim 1: ``q`` is
    ``[R, KVH, Q, *]``, ``cached`` ``[R, L, KVH, D]``. A head's slice of ``cached`` is a strided
    matrix the product reads in place, where a transpose of all heads would be copied first."""
    cached = cached.to(q.dtype)
    return torch.stack([products(q[:, head], cached[:, :, head]) for head in range(cached.shape[2])], dim=1)


def _scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return torch.bmm(queries, keys.transpose(1, 2))


def decode_attention_shared_prefix(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: SharedPrefixLayout, scale: float
) -> torch.Tensor:
    """One query per sequence (``q`` ``[B, heads, D]``) over its cache, shared prefixes read once."""
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group_size = heads // kv_heads
    grouped_q = (q * scale).view(batch, kv_heads, group_size, head_dim)
    num_groups, most_rows = layout.group_rows.shape

    def to_groups(per_row: torch.Tensor) -> torch.Tensor:  # [B, KVH, g, X] -> [G, KVH, M * g, X]
        return per_row[layout.group_rows].transpose(1, 2).reshape(num_groups, kv_heads, most_rows * group_size, -1)

    def to_rows(per_group: torch.Tensor) -> torch.Tensor:  # [G, KVH, M * g, X] -> [B, KVH, g, X]
        grid = per_group.view(num_groups, kv_heads, most_rows, group_size, -1)
        return grid[layout.row_group, :, layout.row_member]

    shared_blocks, private_blocks = layout.group_blocks, layout.private_blocks
    shared = to_rows(_per_kv_head(_scores, to_groups(grouped_q), _gather_blocks(k_cache, shared_blocks)))
    private = _per_kv_head(_scores, grouped_q, _gather_blocks(k_cache, private_blocks))
    scores = torch.cat([shared, private], dim=-1).add_(layout.column_bias[:, None, None, :])
    shared_weights, private_weights = torch.softmax(scores, dim=-1).split([shared.shape[-1], private.shape[-1]], -1)

    out = F.embedding_bag(
        layout.value_rows(kv_heads, group_size),
        v_cache.view(-1, head_dim),
        mode="sum",
        per_sample_weights=private_weights.reshape(batch * heads, -1).to(v_cache.dtype),
    ).view(batch, kv_heads, group_size, head_dim)
    shared_values = _per_kv_head(torch.bmm, to_groups(shared_weights), _gather_blocks(v_cache, shared_blocks))
    # A row outside every group has no shared weights; its place in the grid holds another row's.
    out = out.to(q.dtype).addcmul_(to_rows(shared_values), layout.row_in_group[:, None, None, None])
    return out.view(batch, heads, head_dim)
