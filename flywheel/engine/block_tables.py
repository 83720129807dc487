"""The block tables of consecutive decode steps as one array, refreshed only where they changed.

Between two decode steps most sequences keep their table (a new block comes once every
``block_size`` tokens), so rebuilding a [batch, width] tensor from Python lists every step is
wasted host time. Rows follow the batch's order; a sequence keeps its row data when the batch is
reordered or shrinks, and ``Sequence.table_version`` says when a row must be refreshed. While a
sequence stays in the batch its table only grows or has its last block replaced (copy-on-write),
so a refresh writes the entries from its previous last one on.
"""

from __future__ import annotations

from operator import attrgetter

import torch

from flywheel.engine.sequence import Sequence

_seq_id = attrgetter("seq_id")


class DecodeBlockTables:
    def __init__(self) -> None:
        self.array = torch.full((0, 1), -1, dtype=torch.int32)
        self.seq_ids: list[int] = []
        self.versions: list[int] = []
        self.lengths: list[int] = []
        self.width = 0
        # Bumped whenever the array changes: a copy of it elsewhere knows when to refresh.
        self.version = 0

    def update(self, seqs: list[Sequence], tables_changed: bool = True) -> torch.Tensor:
        """The tables of ``seqs`` in batch order, padded with -1 to the longest (a view of the mirror).

        With ``tables_changed`` False the caller knows that no table changed since the last update:
        for the same rows, nothing is read but their ids.
        """
        seq_ids = list(map(_seq_id, seqs))
        if seq_ids == self.seq_ids and not tables_changed:
            return self.array[:, : self.width]
        width = max(len(seq.block_table) for seq in seqs)
        if seq_ids != self.seq_ids:
            self._reorder(seq_ids)
            self.version += 1
        if width > self.array.shape[1]:
            grown = torch.full((len(seqs), max(width, 2 * self.array.shape[1])), -1, dtype=torch.int32)
            grown[:, : self.array.shape[1]] = self.array
            self.array = grown
        versions, lengths, full_width = self.versions, self.lengths, self.array.shape[1]
        rows, columns, values = [], [], []
        new_rows, new_tables = [], []
        for row, seq in enumerate(seqs):
            if versions[row] != seq.table_version:
                table, known = seq.block_table, lengths[row]
                if known < 0:  # new to the batch: the whole row, written with the other new ones
                    new_rows.append(row)
                    new_tables.append(table + [-1] * (full_width - len(table)))
                elif seq.table_version == versions[row] + 1 and len(table) == known + 1:
                    # One change, a block appended (every row at once, each block_size steps): one entry.
                    rows.append(row)
                    columns.append(known)
                    values.append(table[known])
                else:
                    start, end = max(0, min(known, len(table)) - 1), max(known, len(table))
                    rows += [row] * (end - start)
                    columns += range(start, end)
                    values += table[start:end] + [-1] * (end - max(start, len(table)))
                versions[row], lengths[row] = seq.table_version, len(table)
        if new_rows:
            self.array[new_rows] = torch.tensor(new_tables, dtype=torch.int32)
        if rows:
            self.array[rows, columns] = torch.tensor(values, dtype=torch.int32)
        if new_rows or rows:
            self.version += 1
        self.width = width
        return self.array[:, :width]

    def _reorder(self, seq_ids: list[int]) -> None:
        previous = {seq_id: row for row, seq_id in enumerate(self.seq_ids)}
        source = [previous.get(seq_id, -1) for seq_id in seq_ids]
        if self.seq_ids:
            self.array = self.array[source]
        else:
            self.array = torch.full((len(seq_ids), self.array.shape[1]), -1, dtype=torch.int32)
        # A row new to the batch (source -1 took an arbitrary row's data) is rewritten whole.
        self.versions = [self.versions[row] if row >= 0 else -1 for row in source]
        self.lengths = [self.lengths[row] if row >= 0 else -1 for row in source]
        self.seq_ids = seq_ids
