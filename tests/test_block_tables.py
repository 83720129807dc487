import random

import torch

from flywheel.engine.block_tables import DecodeBlockTables
from flywheel.engine.kv_cache import BlockManager
from flywheel.engine.sampling import SamplingParams
from flywheel.engine.scheduler import Scheduler
from flywheel.engine.sequence import Sequence


def padded(seqs: list[Sequence]) -> torch.Tensor:
    width = max(len(seq.block_table) for seq in seqs)
    return torch.tensor([seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs], dtype=torch.int32)


def test_mirror_equals_the_padded_tables_through_appends_copies_and_batch_changes():
    rng = random.Random(0)
    next_block = iter(range(10**6))
    mirror = DecodeBlockTables()

    def new_seq() -> Sequence:
        seq = Sequence("r", 0, [1], SamplingParams(), None)
        seq.block_table = [next(next_block) for _ in range(rng.randint(1, 5))]
        seq.table_version += 1
        return seq

    batch = [new_seq() for _ in range(12)]
    version, previous = mirror.version, None
    for _ in range(300):
        tables_changed = False
        for seq in batch:
            change = rng.random()
            if change < 0.02:  # a new block
                seq.block_table.append(next(next_block))
                seq.table_version += 1
                tables_changed = True
            elif change < 0.03:  # copy-on-write of the last block
                seq.block_table[-1] = next(next_block)
                seq.table_version += 1
                tables_changed = True
        if rng.random() < 0.2 and len(batch) > 2:  # a sequence finishes
            batch.pop(rng.randrange(len(batch)))
        if rng.random() < 0.2:  # another joins
            batch.insert(rng.randrange(len(batch) + 1), new_seq())
        if rng.random() < 0.1:
            rng.shuffle(batch)
        expected = padded(batch)
        # Told that no table changed, the mirror still notices rows that joined, left or moved.
        assert torch.equal(mirror.update(batch, tables_changed), expected)
        # Its version moves whenever the tables do, so a copy elsewhere (a CUDA graph's) refreshes then.
        if previous is None or not torch.equal(expected, previous):
            assert mirror.version != version
        version, previous = mirror.version, expected


def test_decode_scheduling_says_when_it_changed_a_block_table():
    blocks = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=True)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    seq = Sequence("r", 0, [1, 2, 3, 4, 5, 6], SamplingParams(), None)
    scheduler.add(seq)
    scheduler.schedule()  # the prefill: 6 tokens in 2 blocks
    changed = []
    for step in range(8):
        seq.token_ids.append(step)
        # Both decode paths, each crossing one block boundary: the overlapped one, then the one that may preempt.
        batch = scheduler.schedule_decode_without_preemption([seq]) if step < 4 else scheduler.schedule()
        assert not batch.is_prefill and batch.seqs == [seq]
        changed.append(batch.tables_changed)
    # Positions 6..13 in blocks of 4: a new block at positions 8 and 12.
    assert changed == [False, False, True, False, False, False, True, False]
