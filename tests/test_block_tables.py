import random

import torch

from flywheel.engine.block_tables import DecodeBlockTables
from flywheel.engine.sampling import SamplingParams
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
    for _ in range(300):
        for seq in batch:
            change = rng.random()
            if change < 0.2:  # a new block
                seq.block_table.append(next(next_block))
                seq.table_version += 1
            elif change < 0.3:  # copy-on-write of the last block
                seq.block_table[-1] = next(next_block)
                seq.table_version += 1
        if rng.random() < 0.2 and len(batch) > 2:  # a sequence finishes
            batch.pop(rng.randrange(len(batch)))
        if rng.random() < 0.2:  # another joins
            batch.insert(rng.randrange(len(batch) + 1), new_seq())
        if rng.random() < 0.1:
            rng.shuffle(batch)
        assert torch.equal(mirror.update(batch), padded(batch))

