"""Decode attention that reads a shared prefix once for all the sequences that share it.

The ``n`` completions of a prompt share its full cache blocks. Each group's queries meet the shared
keys in one matrix product, every sequence's queries meet its own keys, and both sets of scores go
through one softmax. The values are then summed straight out of the paged cache by
``embedding_bag`` (a gather fused with the weighted sum), so no copy of them is made. The layout is
built once per step and serves every layer; the part of it that follows from the block tables is
kept while they stay the same. This is the CPU path's decode (memory traffic is its bottleneck).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class SharedBlocks:
    """Which decode rows share which leading blocks (groups padded to one size) and what each row has
    on its own: everything that follows from the block tables alone."""

    group_rows: torch.Tensor  # [G, M]: the rows of each group, padded by repeating its first row
    group_blocks: torch.Tensor  # [G, S]: each group's shared blocks, padded with 0 (masked)
    grid_rows: torch.Tensor  # [B]: each row's place in the [G * M] grid of group rows (0 for a row in none)
    row_in_group: torch.Tensor  # [B]: 1.0 for a row in a group, else 0.0
    shared_lens: torch.Tensor  # [B]: tokens each row shares with its group
    private_blocks: torch.Tensor  # [B, P]: each row's blocks after its shared ones, padded with 0 (masked)
    private_slots: torch.Tensor  # [B, P * block_size]: the cache slot of each private position
    block_size: int
    _value_rows: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def from_block_tables(cls, block_tables: list[list[int]], block_size: int) -> SharedBlocks | None:
        """The grouping, or None when no two rows share a block."""
        by_first_block: dict[int, list[int]] = {}
        for row, table in enumerate(block_tables):
            if len(table) > 1:
                by_first_block.setdefault(table[0], []).append(row)
        shared = [0] * len(block_tables)
        groups = []
        group_and_member = [(0, 0)] * len(block_tables)
        for rows in by_first_block.values():
            if len(rows) < 2:
                continue
            tables = [block_tables[row] for row in rows]
            # A decoding row's last block is its own (copy-on-write), so shared blocks are full.
            common = min(len(t) for t in tables) - 1
            for table in tables[1:]:
                while common and table[:common] != tables[0][:common]:
                    common -= 1
            if common:
                for member, row in enumerate(rows):
                    shared[row] = common
                    group_and_member[row] = (len(groups), member)
                groups.append((rows, tables[0][:common]))
        if not groups:
            return None
        most_rows = max(len(rows) for rows, _ in groups)
        most_blocks = max(len(blocks) for _, blocks in groups)
        width = max(len(t) - s for t, s in zip(block_tables, shared))
        private_blocks = torch.tensor([t[s:] + [0] * (width - len(t) + s) for t, s in zip(block_tables, shared)])
        shared_lens = torch.tensor(shared) * block_size
        return cls(
            group_rows=torch.tensor([rows + rows[:1] * (most_rows - len(rows)) for rows, _ in groups]),
            group_blocks=torch.tensor([b + [0] * (most_blocks - len(b)) for _, b in groups]),
            grid_rows=torch.tensor([group * most_rows + member for group, member in group_and_member]),
            row_in_group=(shared_lens > 0).float(),
            shared_lens=shared_lens,
            private_blocks=private_blocks,
            private_slots=(private_blocks[:, :, None] * block_size + torch.arange(block_size)).flatten(1),
            block_size=block_size,
        )

    def column_bias(self, seq_lens: list[int]) -> torch.Tensor:
        """``[B, (S + P) * block_size]``: 0 at the shared, then the private, positions each row attends
        to; -inf elsewhere."""
        private_lens = torch.tensor(seq_lens) - self.shared_lens
        visible = torch.cat(
            [
                torch.arange(self.group_blocks.shape[1] * self.block_size)[None, :] < self.shared_lens[:, None],
                torch.arange(self.private_slots.shape[1])[None, :] < private_lens[:, None],
            ],
            dim=1,
        )
        return torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))

    def value_rows(self, kv_heads: int, group_size: int) -> torch.Tensor:
        """``[B * heads, P * block_size]``: each query's private rows of the value cache viewed as
        ``[slots * kv_heads, D]``."""
        key = (kv_heads, group_size)
        if key not in self._value_rows:
            rows = self.private_slots[:, None, :] * kv_heads + torch.arange(kv_heads)[None, :, None]
            batch, columns = self.private_slots.shape
            self._value_rows[key] = rows[:, :, None, :].expand(batch, kv_heads, group_size, columns).reshape(-1, columns)
        return self._value_rows[key]

    def to_groups(self, per_row: torch.Tensor) -> torch.Tensor:
        """``[B, Q, X]`` → ``[G, M * Q, X]``: the rows of each group side by side."""
        num_groups, most_rows = self.group_rows.shape
        grouped = per_row.index_select(0, self.group_rows.flatten())
        return grouped.view(num_groups, most_rows * per_row.shape[1], per_row.shape[2])

    def to_rows(self, per_head: list[torch.Tensor]) -> torch.Tensor:
        """One ``[G, M * Q, X]`` per kv head → ``[B, kv_heads, Q, X]``: each row's part of its group's."""
        num_groups, most_rows = self.group_rows.shape
        grid = torch.stack([p.view(num_groups * most_rows, -1) for p in per_head], dim=1)
        per_row = grid.index_select(0, self.grid_rows)
        return per_row.view(len(self.grid_rows), len(per_head), -1, per_head[0].shape[-1])


@dataclass
class SharedPrefixLayout:
    """One decode step's rows: their shared blocks, and the positions each attends to."""

    blocks: SharedBlocks
    column_bias: torch.Tensor  # [B, (S + P) * block_size]

    @classmethod
    def from_block_tables(
        cls, block_tables: list[list[int]], seq_lens: list[int], block_size: int
    ) -> SharedPrefixLayout | None:
        """The layout, or None when no two rows share a block."""
        blocks = _shared_blocks(block_tables, block_size)
        return None if blocks is None else cls(blocks, blocks.column_bias(seq_lens))


# The block tables of the last step and their grouping. Tables change once every block_size steps
# of a sequence, so consecutive decode steps mostly find their grouping here.
_previous: tuple[tuple, SharedBlocks | None] = ((), None)


def _shared_blocks(block_tables: list[list[int]], block_size: int) -> SharedBlocks | None:
    global _previous
    key = (block_size, *map(tuple, block_tables))
    previous_key, blocks = _previous
    if key != previous_key:
        blocks = SharedBlocks.from_block_tables(block_tables, block_size)
        _previous = (key, blocks)
    return blocks


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``cache`` rows of ``blocks`` ``[R, N]`` as ``[R, N * block_size, kv_heads, D]`` (one row copy per block)."""
    num_blocks, block_size = cache.shape[:2]
    gathered = cache.view(num_blocks, -1).index_select(0, blocks.flatten())
    return gathered.view(blocks.shape[0], blocks.shape[1] * block_size, *cache.shape[2:])


def _scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[R, Q, D]`` queries against ``[R, L, D]`` keys. One kv head's keys are a strided slice of the
    gathered blocks that the product reads in place, where a transpose of all heads would be copied."""
    return torch.bmm(queries, keys.transpose(1, 2))


def decode_attention_shared_prefix(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: SharedPrefixLayout, scale: float
) -> torch.Tensor:
    """One query per sequence (``q`` ``[B, heads, D]``) over its cache, shared prefixes read once."""
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    grouped_q = (q * scale).view(batch, kv_heads, heads // kv_heads, head_dim)
    kv_head_range = range(kv_heads)
    blocks = layout.blocks

    shared_keys = _gather_blocks(k_cache, blocks.group_blocks)
    shared = blocks.to_rows([_scores(blocks.to_groups(grouped_q[:, h]), shared_keys[:, :, h]) for h in kv_head_range])
    private_keys = _gather_blocks(k_cache, blocks.private_blocks)
    private = torch.stack([_scores(grouped_q[:, h], private_keys[:, :, h]) for h in kv_head_range], dim=1)
    scores = torch.cat([shared, private], dim=-1).add_(layout.column_bias[:, None, None, :])
    shared_weights, private_weights = torch.softmax(scores, dim=-1).split([shared.shape[-1], private.shape[-1]], -1)

    out = F.embedding_bag(
        blocks.value_rows(kv_heads, heads // kv_heads),
        v_cache.view(-1, head_dim),
        mode="sum",
        per_sample_weights=private_weights.reshape(batch * heads, -1),
    )
    shared_values = _gather_blocks(v_cache, blocks.group_blocks)
    shared_out = blocks.to_rows(
        [torch.bmm(blocks.to_groups(shared_weights[:, h]), shared_values[:, :, h]) for h in kv_head_range]
    )
    # A row outside every group has no shared weights; its place in the grid holds another row's.
    out = out.view(batch, heads, head_dim)
    return out.addcmul_(shared_out.view(batch, heads, head_dim), blocks.row_in_group[:, None, None])
