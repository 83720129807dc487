"""The KV-cache block pool: reference counts, chained prefix-cache hashes, copy-on-write.

A block holds ``block_size`` token positions of every layer's keys and values. Full blocks whose
keys and values have been computed get a hash that covers their tokens and their parent block's
hash, so a new sequence with the same prefix reuses them. Blocks shared by several sequences
(the ``n`` completions of a prompt) are copied before one of them writes into it.
"""

from __future__ import annotations

from collections import OrderedDict

from flywheel.engine.sequence import Sequence


def block_hash(parent_hash: int | None, token_ids: list[int]) -> int:
    return hash((parent_hash, tuple(token_ids)))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: list[int] = []


class BlockManager:
    """Hands out cache blocks to sequences and takes them back."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # In the order they were freed (the oldest cached contents are handed out first); a cached
        # block taken back out of the middle costs O(1).
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        # Every block that holds a hash, so that a reset touches those and not the whole pool.
        self.hashed_block_ids: set[int] = set()
        # Bumped by every reset: a sequence allocated before it holds keys and values that the reset
        # made stale (computed with other weights), so none of its blocks is hashed afterwards.
        self.cache_epoch = 0
        self.prefix_cache_hit_tokens = 0
        # Counts the decode steps' changes to block tables (a new or a copied last block).
        self.appended_blocks = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _take_free_block(self, block_id: int | None = None) -> Block:
        if block_id is None:
            block_id, _ = self.free_block_ids.popitem(last=False)
        else:
            del self.free_block_ids[block_id]
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.hash_to_block_id.get(block.hash) == block_id:
                del self.hash_to_block_id[block.hash]
            self.hashed_block_ids.discard(block_id)
        block.hash, block.token_ids, block.ref_count = None, [], 1
        return block

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of ``seq``'s full blocks before its last token.

        The last token is always recomputed (its logits give the next token), and its keys and values
        are written where it sits: never into a cached block, which other sequences may be reading.
        """
        if not self.enable_prefix_caching:
            return []
        hits, parent = [], None
        for start in range(0, len(seq) - self.block_size, self.block_size):
            tokens = seq.token_ids[start : start + self.block_size]
            parent = block_hash(parent, tokens)
            block_id = self.hash_to_block_id.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._cached_prefix(seq)
        reused_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return self.num_free_blocks - reused_free >= seq.num_blocks_needed(self.block_size) - len(hits)

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` blocks for all its tokens, reusing cached prefix blocks."""
        assert not seq.block_table
        hits = self._cached_prefix(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        for _ in range(seq.num_blocks_needed(self.block_size) - len(hits)):
            seq.block_table.append(self._take_free_block().block_id)
        seq.table_version += 1
        seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
        seq.cache_epoch = self.cache_epoch
        self.prefix_cache_hit_tokens += seq.num_cached_tokens

    def fork(self, parent: Sequence, child: Sequence) -> None:
        parent.fork(child)
        for block_id in child.block_table:
            self.blocks[block_id].ref_count += 1

    def free(self, seq: Sequence) -> None:
        # One pass without a call per block: a rollout's end frees every block of 512 rows at once.
        blocks, free_block_ids = self.blocks, self.free_block_ids
        for block_id in reversed(seq.block_table):
            block = blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                # Keep the hash: the block stays reusable until it is handed out again.
                free_block_ids[block_id] = None
        seq.block_table = []
        seq.table_version += 1
        seq.num_cached_tokens = 0
        seq.num_hashed_blocks = 0

    def has_room_to_append(self, seq: Sequence) -> bool:
        """Whether ``seq``'s last token goes into a block it already owns alone (most decode steps)."""
        position = len(seq.token_ids) - 1
        return position % self.block_size != 0 and self.blocks[seq.block_table[-1]].ref_count == 1

    def blocks_needed_to_append(self, seq: Sequence) -> int:
        """Blocks a decode step of ``seq`` needs: one for a new block or a copy of a shared one."""
        position = len(seq) - 1
        if position // self.block_size >= len(seq.block_table):
            return 1
        return 1 if self.blocks[seq.block_table[-1]].ref_count > 1 else 0

    def append_slot(self, seq: Sequence) -> tuple[int, int] | None:
        """Make room for the KV of ``seq``'s last token; returns a (src, dst) block copy if one is due."""
        position = len(seq) - 1
        if position // self.block_size >= len(seq.block_table):
            seq.block_table.append(self._take_free_block().block_id)
            seq.table_version += 1
            self.appended_blocks += 1
            return None
        last = self.blocks[seq.block_table[-1]]
        if last.ref_count == 1:
            return None
        copy = self._take_free_block()
        last.ref_count -= 1
        seq.block_table[-1] = copy.block_id
        seq.table_version += 1
        self.appended_blocks += 1
        return last.block_id, copy.block_id

    def append_slots(self, seqs: list[Sequence]) -> list[tuple[int, int]]:
        """``append_slot`` for each of ``seqs``; the block copies due. Most steps of a sequence write
        into a last block it owns alone, which is checked here without a call per sequence."""
        block_size, blocks = self.block_size, self.blocks
        copies = []
        for seq in seqs:
            if (len(seq.token_ids) - 1) % block_size and blocks[seq.block_table[-1]].ref_count == 1:
                continue
            copy = self.append_slot(seq)
            if copy is not None:
                copies.append(copy)
        return copies

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Give a hash to each full block of ``seq`` whose keys and values are now computed."""
        if not self.enable_prefix_caching or seq.cache_epoch != self.cache_epoch:
            return
        num_full = seq.num_cached_tokens // self.block_size
        for i in range(seq.num_hashed_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            parent = self.blocks[seq.block_table[i - 1]].hash if i > 0 else None
            if block.hash is None:
                tokens = seq.token_ids[i * self.block_size : (i + 1) * self.block_size]
                block.hash, block.token_ids = block_hash(parent, tokens), tokens
                self.hash_to_block_id.setdefault(block.hash, block.block_id)
                self.hashed_block_ids.add(block.block_id)
            seq.num_hashed_blocks = i + 1

    def reset_prefix_cache(self) -> None:
        self.cache_epoch += 1
        self.hash_to_block_id.clear()
        for block_id in self.hashed_block_ids:
            block = self.blocks[block_id]
            block.hash, block.token_ids = None, []
        self.hashed_block_ids.clear()
