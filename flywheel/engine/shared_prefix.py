"""Decode attention that reads a shared prefix once for all the sequences that share it.

The ``n`` completions of a prompt share its full cache blocks. Each group's queries meet the shared
keys in one matrix product, every sequence's queries meet its own keys, and both sets of scores go
through one softmax. Keys and values are read from copies laid out head by head, which small matrix
products read several times faster than the paged cache: each layer's copies are made at the first
decode step after a prefill and then only extended, by one position per sequence a step (the block
tables change once every ``block_size`` steps and only by a new block at the end). The layout is
built once per step and serves every layer. This is the CPU path's decode (memory traffic is its
bottleneck).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary


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

    def column_bias(self, private_lens: torch.Tensor) -> torch.Tensor:
        """``[B, (S + P) * block_size]``: 0 at the shared, then the private, positions each row attends
        to; -inf elsewhere."""
        visible = torch.cat(
            [
                torch.arange(self.group_blocks.shape[1] * self.block_size)[None, :] < self.shared_lens[:, None],
                torch.arange(self.private_slots.shape[1])[None, :] < private_lens[:, None],
            ],
            dim=1,
        )
        return torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))

    def to_groups(self, per_row: torch.Tensor) -> torch.Tensor:
        """``[B, kv_heads, Q, X]`` → ``[G * kv_heads, M * Q, X]``: the rows of each group side by side."""
        num_groups, most_rows = self.group_rows.shape
        _, kv_heads, per_query, columns = per_row.shape
        grouped = per_row.index_select(0, self.group_rows.flatten()).view(num_groups, most_rows, kv_heads, -1)
        return grouped.transpose(1, 2).reshape(num_groups * kv_heads, most_rows * per_query, columns)

    def to_rows(self, per_group: torch.Tensor, kv_heads: int) -> torch.Tensor:
        """``[G * kv_heads, M * Q, X]`` → ``[B, kv_heads, Q, X]``: each row's part of its group's."""
        num_groups, most_rows = self.group_rows.shape
        columns = per_group.shape[-1]
        grid = per_group.view(num_groups, kv_heads, most_rows, -1).transpose(1, 2)
        grid = grid.reshape(num_groups * most_rows, kv_heads, -1, columns)
        return grid.index_select(0, self.grid_rows)


@dataclass
class HeldKV:
    """One layer's keys and values for the rows of a decode step, copied out of the paged cache head
    by head.

    Between two decode steps with no prefill between them, the rows' cached positions change only
    by one new position per row: copies extended by it stay exact. A prefill (which may reuse freed
    blocks) drops every copy.
    """

    blocks: SharedBlocks  # the grouping and slots the copies follow
    # Each laid out as its product with the queries or the weights reads it fastest.
    shared_keys: torch.Tensor  # [G * kv_heads, D, S * block_size]
    shared_values: torch.Tensor  # [G * kv_heads, S * block_size, D]
    # The private copies are views of the first P * block_size positions of larger stores, so that
    # a new block widens a view instead of copying the copies (once every block_size steps).
    key_store: torch.Tensor  # [B * kv_heads, capacity, D]
    value_store: torch.Tensor  # [B * kv_heads, capacity, D]
    private_lens: torch.Tensor  # [B]: the private positions each row's copy holds

    @classmethod
    def gather(cls, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: SharedPrefixLayout) -> HeldKV:
        blocks = layout.blocks
        return cls(
            blocks=blocks,
            shared_keys=_gather_heads(k_cache, blocks.group_blocks).transpose(1, 2).contiguous(),
            shared_values=_gather_heads(v_cache, blocks.group_blocks),
            key_store=_gather_heads(k_cache, blocks.private_blocks),
            value_store=_gather_heads(v_cache, blocks.private_blocks),
            private_lens=layout.private_lens,
        )

    @property
    def width(self) -> int:
        return self.blocks.private_slots.shape[1]

    @property
    def private_keys(self) -> torch.Tensor:  # [B * kv_heads, P * block_size, D]
        return self.key_store[:, : self.width]

    @property
    def private_values(self) -> torch.Tensor:  # [B * kv_heads, P * block_size, D]
        return self.value_store[:, : self.width]

    def extends_to(self, layout: SharedPrefixLayout) -> bool:
        """Whether ``layout``'s rows are these rows, one position longer, in the same groups."""
        if not torch.equal(self.private_lens + 1, layout.private_lens):
            return False
        held, new = self.blocks, layout.blocks
        if new is held:
            return True
        width = held.private_slots.shape[1]
        if new.private_slots.shape[1] < width or not torch.equal(new.group_blocks, held.group_blocks):
            return False
        held_positions = torch.arange(width)[None, :] < self.private_lens[:, None]
        same_slots = new.private_slots[:, :width] == held.private_slots
        same_groups = torch.equal(new.group_rows, held.group_rows) and torch.equal(new.shared_lens, held.shared_lens)
        return same_groups and bool((same_slots | ~held_positions).all())

    def add_newest(self, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: SharedPrefixLayout) -> None:
        """Widen the copies to ``layout``'s blocks, then copy each row's newest position out of the cache."""
        width = layout.blocks.private_slots.shape[1]
        if width > self.key_store.shape[1]:
            self._widen_stores(width, layout.widest_private)
        self.blocks = layout.blocks
        self.private_lens = layout.private_lens
        kv_heads, head_dim = k_cache.shape[2:]
        slots, rows, positions = layout.newest_positions(kv_heads)
        new_keys = k_cache.view(-1, kv_heads, head_dim).index_select(0, slots).view(-1, head_dim)
        new_values = v_cache.view(-1, kv_heads, head_dim).index_select(0, slots).view(-1, head_dim)
        self.key_store.index_put_((rows, positions), new_keys)
        self.value_store.index_put_((rows, positions), new_values)

    def _widen_stores(self, width: int, widest: int) -> None:
        # Room for several blocks at once, up to the widest the rows can grow: each widening copies
        # the stores into newly mapped memory, whose first touch costs more than the copy.
        capacity = self.key_store.shape[1]
        grow = max(width, min(4 * capacity, widest)) - capacity
        # Zeros, not garbage: a masked position's weight is 0, and 0 * NaN would not be.
        self.key_store = F.pad(self.key_store, (0, 0, 0, grow))
        self.value_store = F.pad(self.value_store, (0, 0, 0, grow))


@dataclass
class SharedPrefixLayout:
    """One decode step's rows: their shared blocks, and the positions each attends to."""

    blocks: SharedBlocks
    private_lens: torch.Tensor  # [B]: positions each row attends to beyond its shared ones
    column_bias: torch.Tensor  # [B, (S + P) * block_size]
    widest_private: int  # the most private positions any row can reach before it ends, in whole blocks
    _newest: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_block_tables(
        cls, block_tables: list[list[int]], seq_lens: list[int], length_limits: list[int], block_size: int
    ) -> SharedPrefixLayout | None:
        """The layout, or None when no two rows share a block. ``length_limits``: the length at which
        each row ends."""
        blocks = _shared_blocks(block_tables, block_size)
        if blocks is None:
            return None
        private_lens = torch.tensor(seq_lens) - blocks.shared_lens
        widest = max(limit - shared for limit, shared in zip(length_limits, blocks.shared_lens.tolist()))
        return cls(blocks, private_lens, blocks.column_bias(private_lens), -(-widest // block_size) * block_size)

    def newest_positions(self, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cache slot of each row's newest position ``[B]``, and, per row and head ``[B * kv_heads]``,
        its row in the held copies and its place there; the same for every layer."""
        if kv_heads not in self._newest:
            newest = self.private_lens - 1
            slots = self.blocks.private_slots.gather(1, newest[:, None])[:, 0]
            self._newest[kv_heads] = slots, torch.arange(len(newest) * kv_heads), newest.repeat_interleave(kv_heads)
        return self._newest[kv_heads]


# The block tables of the last step and their grouping. Tables change once every block_size steps
# of a sequence, so consecutive decode steps mostly find their grouping here.
_previous: tuple[tuple, SharedBlocks | None] = ((), None)


# Per layer, keyed by its key cache: the copies the last decode step read.
_held: WeakIdKeyDictionary = WeakIdKeyDictionary()


def forget_kept_layout() -> None:
    """Called on prefill, which writes cache positions that the kept copies do not follow."""
    global _previous
    _previous = ((), None)
    _held.clear()


def _held_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, layout: SharedPrefixLayout) -> HeldKV:
    held = _held.get(k_cache)
    if held is not None and held.extends_to(layout):
        held.add_newest(k_cache, v_cache, layout)
    else:
        held = _held[k_cache] = HeldKV.gather(k_cache, v_cache, layout)
    return held


def _shared_blocks(block_tables: list[list[int]], block_size: int) -> SharedBlocks | None:
    global _previous
    key = (block_size, *map(tuple, block_tables))
    previous_key, blocks = _previous
    if key != previous_key:
        blocks = SharedBlocks.from_block_tables(block_tables, block_size)
        _previous = (key, blocks)
    return blocks


def _gather_heads(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``cache`` rows of ``blocks`` ``[R, N]`` as ``[R * kv_heads, N * block_size, D]`` (one row copy per
    block, then one transpose)."""
    num_blocks, block_size, kv_heads, head_dim = cache.shape
    gathered = cache.view(num_blocks, -1).index_select(0, blocks.flatten())
    per_row = gathered.view(blocks.shape[0], blocks.shape[1] * block_size, kv_heads, head_dim)
    return per_row.transpose(1, 2).reshape(-1, blocks.shape[1] * block_size, head_dim)


def decode_attention_shared_prefix(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, layout: SharedPrefixLayout, scale: float
) -> torch.Tensor:
    """One query per sequence (``q`` ``[B, heads, D]``) over its cache, shared prefixes read once."""
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    blocks = layout.blocks
    held = _held_kv(k_cache, v_cache, layout)
    queries = (q * scale).view(batch, kv_heads, heads // kv_heads, head_dim)

    shared = blocks.to_rows(torch.bmm(blocks.to_groups(queries), held.shared_keys), kv_heads)
    private = torch.bmm(queries.view(batch * kv_heads, -1, head_dim), held.private_keys.transpose(1, 2))
    scores = torch.cat([shared, private.view(batch, kv_heads, -1, private.shape[-1])], dim=-1)
    scores.add_(layout.column_bias[:, None, None, :])
    shared_weights, private_weights = torch.softmax(scores, dim=-1).split([shared.shape[-1], private.shape[-1]], -1)

    private_weights = private_weights.reshape(batch * kv_heads, -1, private.shape[-1])
    out = torch.bmm(private_weights, held.private_values)
    shared_out = blocks.to_rows(torch.bmm(blocks.to_groups(shared_weights), held.shared_values), kv_heads)
    # A row outside every group has no shared weights; its place in the grid holds another row's.
    out = out.reshape(batch, heads, head_dim)
    return out.addcmul_(shared_out.view(batch, heads, head_dim), blocks.row_in_group[:, None, None])
