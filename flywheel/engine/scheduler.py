"""Continuous batching: which sequences run in the next step, prefill or decode.

Waiting sequences are admitted (prefilled) while the token budget, the sequence limit and the free
blocks allow; otherwise every running sequence decodes one token. When a decode step lacks blocks,
the most recently admitted sequences are preempted: their blocks are freed and they wait to be
prefilled again from their tokens so far (recompute).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from flywheel.engine.kv_cache import BlockManager
from flywheel.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    is_prefill: bool
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    # Decode: whether scheduling it changed a block table (False: each row's table is as in the last step).
    tables_changed: bool = True

    @property
    def num_new_tokens(self) -> int:
        if not self.is_prefill:
            return len(self.seqs)
        return sum(len(seq) - seq.num_cached_tokens for seq in self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _seats(self, seq: Sequence) -> int:
        return 1 + len(seq.pending_forks)

    def schedule(self) -> ScheduledBatch | None:
        batch = self._schedule_prefill()
        if batch is not None:
            return batch
        return self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch | None:
        if not self.waiting:
            return None
        scheduled: list[Sequence] = []
        budget = self.max_num_batched_tokens
        seats = self.max_num_seqs - sum(self._seats(s) for s in self.running)
        while self.waiting:
            seq = self.waiting[0]
            if self._seats(seq) > seats or not self.block_manager.can_allocate(seq):
                break
            # A conservative check before allocating: the whole sequence counts against the budget.
            if scheduled and len(seq) > budget:
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            budget -= len(seq) - seq.num_cached_tokens
            seats -= self._seats(seq)
            scheduled.append(seq)
            self.running.append(seq)
        return ScheduledBatch(scheduled, is_prefill=True) if scheduled else None

    def _schedule_decode(self) -> ScheduledBatch | None:
        if not self.running:
            return None
        copies: list[tuple[int, int]] = []
        scheduled: list[Sequence] = []
        queue = deque(self.running)
        block_manager = self.block_manager
        appended_before = block_manager.appended_blocks
        while queue:
            seq = queue.popleft()
            if block_manager.has_room_to_append(seq):
                scheduled.append(seq)
                continue
            while block_manager.blocks_needed_to_append(seq) > block_manager.num_free_blocks:
                if queue:
                    self._preempt(queue.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                copy = self.block_manager.append_slot(seq)
                if copy is not None:
                    copies.append(copy)
                scheduled.append(seq)
        self.running = scheduled
        if not scheduled:
            raise RuntimeError(
                "the KV cache cannot hold a single sequence: raise kv_cache_memory_gb / gpu_memory_utilization "
                "or lower max_model_len"
            )
        return ScheduledBatch(scheduled, is_prefill=False, block_copies=copies,
                              tables_changed=block_manager.appended_blocks != appended_before)

    def schedule_decode_without_preemption(self, seqs: list[Sequence]) -> ScheduledBatch | None:
        """A decode step of ``seqs`` when the free blocks cover it (None otherwise): the running
        sequences stay as they are, so this can be decided before the previous step's tokens are known."""
        block_manager = self.block_manager
        # A sequence needs at most one block: count them only when the free blocks might not cover it.
        if len(seqs) > block_manager.num_free_blocks and \
                sum(block_manager.blocks_needed_to_append(seq) for seq in seqs) > block_manager.num_free_blocks:
            return None
        appended_before = block_manager.appended_blocks
        copies = block_manager.append_slots(seqs)
        return ScheduledBatch(seqs, is_prefill=False, block_copies=copies,
                              tables_changed=block_manager.appended_blocks != appended_before)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq)

    def remove_finished(self) -> None:
        self.running = [seq for seq in self.running if not seq.is_finished]

    def abort(self, request_id: str) -> list[Sequence]:
        aborted = [s for s in list(self.waiting) + self.running if s.request_id == request_id]
        for seq in aborted:
            if seq.status == SequenceStatus.RUNNING:
                self.block_manager.free(seq)
            seq.status = SequenceStatus.FINISHED
        self.waiting = deque(s for s in self.waiting if s.request_id != request_id)
        self.running = [s for s in self.running if s.request_id != request_id]
        return aborted
