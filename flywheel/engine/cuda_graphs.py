"""CUDA graphs of the decode step, one per batch size of a ladder.

A decode step launches a few hundred small kernels; replaying a captured graph removes the launch
gaps between them. A graph runs the model and its LM head, and returns the logits. Its inputs live
in static buffers: the per-row ones (ids, positions, cache slots, lengths) in one buffer that a
single host-to-device copy fills each step, the block tables in another, copied only when they
changed (once every ``block_size`` steps of a steady batch). Rows past the real batch are padding
(slot -1 writes nothing, length 0 attends to nothing). The sizes given are captured up front, any
other size of the ladder the first time a batch needs it.
"""

from __future__ import annotations

import torch

from flywheel.engine.forward_context import ForwardContext

# The per-row inputs in their static buffer: name, dtype. Offsets are multiples of 8 bytes.
_ROW_INPUTS = (("input_ids", torch.long), ("positions", torch.long), ("slot_mapping", torch.long),
               ("seq_lens", torch.int32))


def batch_size_ladder(max_batch: int) -> list[int]:
    sizes = [size for size in (1, 2, 4, 8) if size < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sizes + [max_batch]


def _row_input_layout(rows: int) -> tuple[list[tuple[str, torch.dtype, int]], int]:
    """(name, dtype, byte offset) of each per-row input in its buffer, and the buffer's size in bytes."""
    layout, offset = [], 0
    for name, dtype in _ROW_INPUTS:
        layout.append((name, dtype, offset))
        offset += -(-rows * dtype.itemsize // 8) * 8
    return layout, offset


class DecodeGraphs:
    def __init__(self, model, kv_caches, backend, max_batch: int, max_blocks: int, vocab_size: int, dtype, device,
                 capture_sizes: list[int] | None = None) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.sizes = batch_size_ladder(max_batch)
        self.max_batch = max_batch
        self.row_layout, nbytes = _row_input_layout(max_batch)
        self.row_inputs = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        views = self._row_input_views(self.row_inputs)
        self.input_ids, self.positions = views["input_ids"], views["positions"]
        self.slot_mapping, self.seq_lens = views["slot_mapping"], views["seq_lens"]
        self.block_tables = torch.zeros((max_batch, max_blocks), dtype=torch.int32, device=device)
        # The version of the host's block tables last copied in (None: none yet).
        self.block_tables_version: int | None = None
        self.logits = torch.zeros((max_batch, vocab_size), dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replayed_sizes: set[int] = set()
        self.pool = None
        # Largest first: the smaller graphs reuse the memory pool the largest one sized.
        for size in sorted(self.sizes if capture_sizes is None else capture_sizes, reverse=True):
            self._capture(size)

    def _row_input_views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-row inputs as views of a uint8 buffer of their layout's size."""
        return {name: buffer[offset : offset + self.max_batch * dtype.itemsize].view(dtype)
                for name, dtype, offset in self.row_layout}

    def _context(self, size: int) -> ForwardContext:
        return ForwardContext(
            is_prefill=False,
            slot_mapping=self.slot_mapping[:size],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            kv_caches=self.kv_caches,
            backend=self.backend,
        )

    def _forward(self, size: int) -> None:
        hidden = self.model(self.input_ids[:size], self.positions[:size], self._context(size))
        self.model.compute_logits(hidden, out=self.logits[:size])

    @torch.inference_mode()
    def _capture(self, size: int) -> None:
        # Padding rows only: neither the warm-up nor the capture writes into the cache.
        self.slot_mapping[:size].fill_(-1)
        self.seq_lens[:size].zero_()
        self._forward(size)  # warm-up
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._forward(size)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[size] = graph

    def fits(self, batch: int, table_width: int) -> bool:
        return batch <= self.sizes[-1] and table_width <= self.block_tables.shape[1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            seq_lens: torch.Tensor, block_tables: torch.Tensor, block_tables_version: int | None) -> torch.Tensor:
        """The logits of one decode step. Every input is on the host except ``input_ids``, which may be
        on the device (the previous step's draw); the block tables are copied only when
        ``block_tables_version`` differs from the last one copied (None: always)."""
        batch = len(positions)
        size = next(s for s in self.sizes if s >= batch)
        if size not in self.graphs:
            self._capture(size)
        staged = torch.empty(self.row_inputs.shape, dtype=torch.uint8, pin_memory=True)
        rows = self._row_input_views(staged)
        ids_on_host = input_ids.device.type == "cpu"
        if ids_on_host:
            rows["input_ids"][:batch] = input_ids
        rows["positions"][:batch] = positions
        rows["slot_mapping"][:batch] = slot_mapping
        rows["seq_lens"][:batch] = seq_lens
        # Padding rows: valid ids and positions, nothing written to the cache, nothing attended to.
        rows["input_ids"][batch:size] = 0
        rows["positions"][batch:size] = 0
        rows["slot_mapping"][batch:size] = -1
        rows["seq_lens"][batch:size] = 0
        self.row_inputs.copy_(staged, non_blocking=True)
        if not ids_on_host:
            self.input_ids[:batch].copy_(input_ids, non_blocking=True)
        if block_tables_version is None or block_tables_version != self.block_tables_version:
            tables = torch.empty(block_tables.shape, dtype=torch.int32, pin_memory=True).copy_(block_tables)
            self.block_tables[:batch, : block_tables.shape[1]].copy_(tables, non_blocking=True)
            self.block_tables_version = block_tables_version
        self.graphs[size].replay()
        self.replayed_sizes.add(size)
        return self.logits[:batch]
