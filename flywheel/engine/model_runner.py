"""Runs the model for a scheduled batch: input tensors, forward over the paged KV cache, logits.

One runner lives on every tensor-parallel rank. Rank 0 turns scheduled sequences into a
``StepInputs`` of CPU tensors, every rank executes it, and rank 0 samples from the logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig

from flywheel.engine import attention
from flywheel.engine.block_tables import DecodeBlockTables
from flywheel.engine.config import EngineConfig
from flywheel.engine.cuda_graphs import DecodeGraphs
from flywheel.engine.distributed import TensorParallelGroup
from flywheel.engine.forward_context import ForwardContext
from flywheel.engine.host_to_device import to_device
from flywheel.engine.models.registry import model_class
from flywheel.engine.scheduler import ScheduledBatch
from flywheel.engine.shared_prefix import SharedPrefixLayout
from flywheel.engine.weights import load_checkpoint

logger = logging.getLogger(__name__)

CPU_KV_CACHE_GB = 1.0
# Room kept for the CUDA graphs' memory pool and the sampler's buffers.
GRAPH_RESERVE_BYTES = 1 << 30


@dataclass
class StepInputs:
    """A batch as tensors, built on the host by rank 0 and run by every rank."""

    is_prefill: bool
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    # The rows whose logits are sampled; None: every row (a decode step).
    logits_indices: torch.Tensor | None
    cu_seqlens_q: torch.Tensor | None = None
    max_seq_len: int = 0
    max_q_len: int = 0
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    shared_prefix: SharedPrefixLayout | None = None
    # Decode: changes whenever the block tables change (a CUDA graph copies them only then).
    block_tables_version: int | None = None


def checkpoint_dtype(hf_config) -> torch.dtype | None:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def memory_outside_torch(device: torch.device) -> int:
    """Bytes in use on the GPU that PyTorch's allocator does not hold: other processes', CUDA's own."""
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) - torch.cuda.memory_reserved(device)


def load_hf_config(config: EngineConfig):
    return AutoConfig.from_pretrained(config.model, revision=config.revision, trust_remote_code=config.trust_remote_code)


class ModelRunner:
    def __init__(self, config: EngineConfig, tp: TensorParallelGroup, device: torch.device) -> None:
        self.config = config
        self.tp = tp
        self.device = device
        self.hf_config = load_hf_config(config)
        self.dtype = config.torch_dtype(checkpoint_dtype(self.hf_config))
        self.block_size = config.block_size
        self.backend = attention
        if device.type == "cuda":
            torch.cuda.set_device(device)
            self._outside_torch_at_start = memory_outside_torch(device)
            self._allocated_at_start = torch.cuda.memory_allocated(device)
            from flywheel.engine import kernels

            self.backend = kernels.backend()
        cls = model_class(self.hf_config)
        previous_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(device):
                self.model = cls(self.hf_config, tp)
        finally:
            torch.set_default_dtype(previous_dtype)
        self.model.requires_grad_(False)
        if config.load_format == "dummy":
            self._randomize_weights()
        else:
            load_checkpoint(self.model, config.model)
        attn = self.model.layers[0].self_attn
        self.num_kv_heads, self.head_dim = attn.num_kv_heads, attn.head_dim
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.decode_graphs: DecodeGraphs | None = None
        self._graph_sizes_before_sleep: list[int] | None = None
        self.decode_block_tables = DecodeBlockTables()

    def _randomize_weights(self) -> None:
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed + self.tp.rank)
        for name, param in self.model.named_parameters():
            if "norm" in name:
                param.data.fill_(1.0)
            else:
                param.data.uniform_(-0.05, 0.05, generator=generator)

    @property
    def tp_rank(self) -> int:
        return self.tp.rank

    @property
    def tp_size(self) -> int:
        return self.tp.size

    @property
    def block_bytes(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * len(self.model.layers) * self.block_size * self.num_kv_heads * self.head_dim * element

    def plan_num_blocks(self, max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int) -> int:
        """How many KV-cache blocks fit the memory the config allows."""
        self.max_model_len, self.max_num_seqs = max_model_len, max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.config.kv_cache_memory_gb is not None or self.device.type != "cuda":
            budget = (self.config.kv_cache_memory_gb or CPU_KV_CACHE_GB) * 2**30
            # Never more than every sequence at full length could use.
            useful = max_num_seqs * -(-max_model_len // self.block_size) + 1
            return max(1, min(int(budget // self.block_bytes), useful))
        return self._blocks_from_gpu_memory()

    def _blocks_from_gpu_memory(self) -> int:
        """Blocks that fit ``gpu_memory_utilization`` of the GPU after the weights and the
        activations of the largest prefill step, measured by running one."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_forward()
        # gpu_memory_utilization is this engine's share of the GPU (as in vLLM): what other processes
        # (or this one, before the engine started) hold does not count against it; what the engine
        # allocated since it started, inside PyTorch or outside, does.
        peak = max(0, torch.cuda.max_memory_allocated(self.device) - self._allocated_at_start)
        free, total = torch.cuda.mem_get_info(self.device)
        grown_outside = max(0, memory_outside_torch(self.device) - self._outside_torch_at_start)
        reserve = GRAPH_RESERVE_BYTES + self._graph_logits_bytes()
        share = total * self.config.gpu_memory_utilization - peak - grown_outside - reserve
        available = free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        budget = min(share, available - reserve)
        if budget < self.block_bytes:
            raise ValueError(
                f"no GPU memory is left for the KV cache: this engine's share ({self.config.gpu_memory_utilization} of "
                f"{total / 2**30:.1f} GiB) minus its weights and activations ({peak / 2**30:.1f} GiB) leaves "
                f"{share / 2**30:.1f} GiB, and {available / 2**30:.1f} GiB is free on the device: raise "
                "gpu_memory_utilization, lower max_num_batched_tokens or free the GPU"
            )
        return int(budget // self.block_bytes)

    def _graph_logits_bytes(self) -> int:
        """The decode graphs' static logits, [max_num_seqs, vocab] (none without graphs)."""
        if self.config.enforce_eager or self.tp.size > 1:
            return 0
        return self.max_num_seqs * self.hf_config.vocab_size * self.dtype.itemsize

    def _profile_forward(self) -> None:
        tokens = self.max_num_batched_tokens
        seq_len = min(tokens, self.max_model_len)
        num_seqs = -(-tokens // seq_len)
        blocks_per_seq = -(-seq_len // self.block_size)
        self.allocate_kv_cache(num_seqs * blocks_per_seq)
        block_tables = torch.arange(num_seqs * blocks_per_seq, dtype=torch.int32).view(num_seqs, blocks_per_seq)
        positions = torch.arange(seq_len).repeat(num_seqs)
        slots = (block_tables[:, :, None] * self.block_size + torch.arange(self.block_size)).flatten(1)[:, :seq_len]
        inputs = StepInputs(
            is_prefill=True,
            input_ids=torch.zeros(num_seqs * seq_len, dtype=torch.long),
            positions=positions,
            slot_mapping=slots.flatten().long(),
            seq_lens=torch.full((num_seqs,), seq_len, dtype=torch.int32),
            block_tables=block_tables,
            logits_indices=torch.arange(seq_len - 1, num_seqs * seq_len, seq_len),
            cu_seqlens_q=torch.arange(0, num_seqs * seq_len + 1, seq_len, dtype=torch.int32),
            max_seq_len=seq_len,
            max_q_len=seq_len,
        )
        self.execute(inputs)
        torch.cuda.synchronize(self.device)
        self.free_kv_cache()

    def allocate_kv_cache(self, num_blocks: int) -> None:
        shape = (num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in self.model.layers
        ]
        self.num_blocks = num_blocks

    def capture_decode_graphs(self) -> None:
        """Capture the decode step (GPU, unless enforce_eager): the whole batch-size ladder the first
        time, after a sleep only the sizes replayed before it (the rest when first needed)."""
        if self.device.type != "cuda" or self.config.enforce_eager or self.tp.size > 1:
            return
        self.decode_graphs = DecodeGraphs(
            self.model, self.kv_caches, self.backend, self.max_num_seqs,
            -(-self.max_model_len // self.block_size), self.hf_config.vocab_size, self.dtype, self.device,
            capture_sizes=self._graph_sizes_before_sleep,
        )

    def free_kv_cache(self) -> None:
        if self.decode_graphs is not None:
            self._graph_sizes_before_sleep = sorted(self.decode_graphs.replayed_sizes)
        self.decode_graphs = None
        self.kv_caches = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def prepare(self, batch: ScheduledBatch, input_ids: torch.Tensor | None = None) -> StepInputs:
        """Rank 0: the tensors of a scheduled batch (on the host). A decode step may be given its
        ``input_ids`` (the previous step's sampled ids, still on the device)."""
        if not batch.is_prefill:
            return self._prepare_decode(batch, input_ids)
        input_ids, positions, seq_lens, logits_indices = [], [], [], []
        cu_seqlens_q = [0]
        for seq in batch.seqs:
            start = seq.num_cached_tokens
            input_ids.extend(seq.token_ids[start:])
            positions.extend(range(start, len(seq)))
            seq_lens.append(len(seq))
            cu_seqlens_q.append(cu_seqlens_q[-1] + len(seq) - start)
            logits_indices.extend([cu_seqlens_q[-1] - 1] * (1 + len(seq.pending_forks)))
        positions = torch.tensor(positions, dtype=torch.long)
        block_tables = self._block_tables(batch)
        # Each new token's cache slot: its block in its sequence's table, then its offset in the block.
        new_tokens = torch.tensor(cu_seqlens_q).diff()
        rows = torch.repeat_interleave(torch.arange(len(batch.seqs)), new_tokens)
        blocks = block_tables[rows, positions // self.block_size].long()
        return StepInputs(
            is_prefill=True,
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            positions=positions,
            slot_mapping=blocks * self.block_size + positions % self.block_size,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=block_tables,
            logits_indices=torch.tensor(logits_indices, dtype=torch.long),
            cu_seqlens_q=torch.tensor(cu_seqlens_q, dtype=torch.int32),
            max_seq_len=max(seq_lens),
            max_q_len=max(b - a for a, b in zip(cu_seqlens_q, cu_seqlens_q[1:])),
            block_copies=batch.block_copies,
        )

    def _prepare_decode(self, batch: ScheduledBatch, input_ids: torch.Tensor | None) -> StepInputs:
        seqs = batch.seqs
        if input_ids is None:
            input_ids = torch.tensor([seq.token_ids[-1] for seq in seqs], dtype=torch.long)
        tables = self.decode_block_tables.update(seqs, batch.tables_changed)
        seq_lens = torch.tensor([len(seq.token_ids) for seq in seqs], dtype=torch.int32)
        positions = seq_lens.long() - 1
        last_blocks = tables.gather(1, (positions // self.block_size)[:, None])[:, 0].long()
        return StepInputs(
            is_prefill=False,
            input_ids=input_ids,
            positions=positions,
            slot_mapping=last_blocks * self.block_size + positions % self.block_size,
            seq_lens=seq_lens,
            block_tables=tables,
            logits_indices=None,
            max_seq_len=int(positions.max()) + 1,
            max_q_len=1,
            block_copies=batch.block_copies,
            shared_prefix=self._shared_prefix(batch, seq_lens),
            block_tables_version=self.decode_block_tables.version,
        )

    def _shared_prefix(self, batch: ScheduledBatch, seq_lens: torch.Tensor) -> SharedPrefixLayout | None:
        # The Triton decode kernel reads the cache at the GPU's bandwidth; on the CPU, reading a
        # shared prompt once per group instead of once per completion is the larger win.
        if self.backend is not attention:
            return None
        seq_lens = seq_lens.tolist()
        seqs = batch.seqs
        return SharedPrefixLayout.from_block_tables([seq.block_table for seq in seqs], seq_lens,
                                                    [seq.length_limit for seq in seqs], self.block_size)

    @staticmethod
    def _block_tables(batch: ScheduledBatch) -> torch.Tensor:
        width = max(len(seq.block_table) for seq in batch.seqs)
        return torch.tensor([seq.block_table + [-1] * (width - len(seq.block_table)) for seq in batch.seqs], dtype=torch.int32)

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Every rank: run the forward pass; returns the logits of the rows to sample."""
        self._copy_blocks(inputs.block_copies)
        graphs = self.decode_graphs
        if not inputs.is_prefill and graphs is not None and graphs.fits(len(inputs.input_ids),
                                                                          inputs.block_tables.shape[1]):
            return graphs.run(inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.seq_lens,
                              inputs.block_tables, inputs.block_tables_version)
        input_ids, positions, slot_mapping, seq_lens, block_tables, logits_indices, cu_seqlens_q = to_device(
            [inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.seq_lens, inputs.block_tables,
             inputs.logits_indices, inputs.cu_seqlens_q], self.device)
        context = ForwardContext(
            is_prefill=inputs.is_prefill,
            slot_mapping=slot_mapping,
            seq_lens=seq_lens,
            block_tables=block_tables,
            kv_caches=self.kv_caches,
            backend=self.backend,
            cu_seqlens_q=cu_seqlens_q,
            max_seq_len=inputs.max_seq_len,
            max_q_len=inputs.max_q_len,
            shared_prefix=inputs.shared_prefix,
        )
        hidden = self.model(input_ids, positions, context)
        if logits_indices is not None:
            hidden = hidden[logits_indices]
        return self.model.compute_logits(hidden)

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        source, destination = to_device([torch.tensor([s for s, _ in copies]), torch.tensor([d for _, d in copies])],
                                        self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[destination] = k_cache[source]
            v_cache[destination] = v_cache[source]

    def load_weights(self, weights) -> None:
        self.model.load_weights(weights)
