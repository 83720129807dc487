"""CUDA graphs of the decode step, one per batch size of a ladder.

A decode step launches a few hundred small kernels; replaying a captured graph removes the launch
gaps between them. Inputs are copied into static buffers; rows past the real batch are padding
(slot -1 writes nothing, length 0 attends to nothing). The sizes given are captured up front, any
other size of the ladder the first time a batch needs it.
"""

from __future__ import annotations

import torch

from flywheel.engine.forward_context import ForwardContext


def batch_size_ladder(max_batch: int) -> list[int]:
    sizes = [size for size in (1, 2, 4, 8) if size < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model, kv_caches, backend, max_batch: int, max_blocks: int, hidden_size: int, dtype, device,
                 capture_sizes: list[int] | None = None) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.backend = backend
        self.sizes = batch_size_ladder(max_batch)
        self.input_ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((max_batch, max_blocks), dtype=torch.int32, device=device)
        self.hidden = torch.zeros((max_batch, hidden_size), dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replayed_sizes: set[int] = set()
        self.pool = None
        # Largest first: the smaller graphs reuse the memory pool the largest one sized.
        for size in sorted(self.sizes if capture_sizes is None else capture_sizes, reverse=True):
            self._capture(size)

    def _context(self, size: int) -> ForwardContext:
        return ForwardContext(
            is_prefill=False,
            slot_mapping=self.slot_mapping[:size],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            kv_caches=self.kv_caches,
            backend=self.backend,
        )

    @torch.inference_mode()
    def _capture(self, size: int) -> None:
        # Padding rows only: neither the warm-up nor the capture writes into the cache.
        self.slot_mapping[:size].fill_(-1)
        self.seq_lens[:size].zero_()
        context = self._context(size)
        self.hidden[:size] = self.model(self.input_ids[:size], self.positions[:size], context)  # warm-up
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.hidden[:size] = self.model(self.input_ids[:size], self.positions[:size], context)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[size] = graph

    def fits(self, batch: int, table_width: int) -> bool:
        return batch <= self.sizes[-1] and table_width <= self.block_tables.shape[1]

    def run(self, input_ids, positions, slot_mapping, seq_lens, block_tables) -> torch.Tensor:
        batch = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= batch)
        if size not in self.graphs:
            self._capture(size)
        self.input_ids[:batch].copy_(input_ids, non_blocking=True)
        self.positions[:batch].copy_(positions, non_blocking=True)
        self.slot_mapping[:batch].copy_(slot_mapping, non_blocking=True)
        self.slot_mapping[batch:size].fill_(-1)
        self.seq_lens[:batch].copy_(seq_lens, non_blocking=True)
        self.seq_lens[batch:size].fill_(0)
        self.block_tables[:batch, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        self.graphs[size].replay()
        self.replayed_sizes.add(size)
        return self.hidden[:batch]
