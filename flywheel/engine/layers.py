"""The building blocks of the native models: norms, rotary embedding, activation, and linear,
embedding and LM-head layers sharded for tensor parallelism.

Every sharded parameter carries a ``shard_loader(param, loaded, shard_id) -> (destination, source)``
that picks this rank's piece of a full Hugging Face tensor; ``weights.py`` checks the full shapes
before it copies anything.
"""

from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F
from torch import nn

from flywheel.engine.distributed import TensorParallelGroup


@functools.cache
def _triton_kernels():
    from flywheel.engine import kernels

    return kernels


def fused_kernels(x: torch.Tensor):
    """The Triton kernels for tensors on a GPU, else None (the PyTorch path)."""
    return _triton_kernels() if x.is_cuda else None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        kernels = fused_kernels(x)
        if kernels is not None:
            if residual is None:
                return kernels.rms_norm(x, self.weight, self.eps)
            return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * normed.to(dtype)
        return out if residual is None else (out, residual)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the rotate-half layout of Qwen and Llama checkpoints."""

    def __init__(self, head_dim: int, max_position: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        # The positions of the last CPU forward pass and their angles (see _angles).
        self._angles_positions: torch.Tensor | None = None
        self._angles_of_positions: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """``q`` ``[T, heads, D]``, ``k`` ``[T, kv_heads, D]``, ``positions`` ``[T]``."""
        kernels = fused_kernels(q)
        if kernels is not None:
            return kernels.rotary_embedding(positions, q, k, (self.cos, self.sin), q.shape[-1])
        cos, sin = self._angles(positions)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def _angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, 1, D]`` cosines and signed sines of ``positions``, laid out for ``_rotate``."""
        # Every layer of a forward pass rotates at the same positions: look their angles up once.
        if positions is not self._angles_positions:
            cos, sin = self.cos[positions], self.sin[positions]
            self._angles_of_positions = torch.cat((cos, cos), -1)[:, None], torch.cat((-sin, sin), -1)[:, None]
            self._angles_positions = positions
        return self._angles_of_positions


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half: ``(a, b) -> (a cos - b sin, b cos + a sin)`` over the two halves of the last dim."""
    x32 = x.float()
    return (x32 * cos + x32.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    kernels = fused_kernels(x)
    if kernels is not None:
        return kernels.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# Measured on x86-64 only; elsewhere the CPU path keeps F.linear.
_ONEDNN_ON_CPU = (
    platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + b``; on the CPU through oneDNN, whose small-batch products of the decode step run
    1.1–1.9× faster than ``F.linear``'s BLAS call (it reads the weight as it is, so in-place weight
    updates are seen)."""
    if _ONEDNN_ON_CPU and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class ColumnParallelLinear(nn.Module):
    """``y = x Wᵀ + b`` with the output features split across ranks, as concatenated pieces."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, tp: TensorParallelGroup) -> None:
        super().__init__()
        for size in out_sizes:
            if size % tp.size:
                raise ValueError(f"output size {size} is not divisible by tensor_parallel_size {tp.size}")
        self.tp = tp
        self.local_sizes = [size // tp.size for size in out_sizes]
        local_out = sum(self.local_sizes)
        self.weight = nn.Parameter(torch.empty(local_out, in_features))
        self.bias = nn.Parameter(torch.empty(local_out)) if bias else None
        for param in self.parameters():
            param.shard_loader = self._shard

    def _shard(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: int | None):
        index = shard_id or 0
        offset = sum(self.local_sizes[:index])
        size = self.local_sizes[index]
        destination = param.narrow(0, offset, size)
        return destination, loaded.narrow(0, self.tp.rank * size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """The fused q, k, v projection; query heads split across ranks, key/value heads too
    (replicated when there are fewer key/value heads than ranks)."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp: TensorParallelGroup):
        if num_heads % tp.size:
            raise ValueError(f"num_attention_heads {num_heads} is not divisible by tensor_parallel_size {tp.size}")
        if num_kv_heads % tp.size and tp.size % num_kv_heads:
            raise ValueError(f"num_key_value_heads {num_kv_heads} and tensor_parallel_size {tp.size} do not divide")
        self.num_local_heads = num_heads // tp.size
        self.num_local_kv_heads = max(1, num_kv_heads // tp.size)
        self.head_dim = head_dim
        replicas = max(1, tp.size // num_kv_heads)
        self.kv_head_start = (tp.rank // replicas) * self.num_local_kv_heads
        local_kv = self.num_local_kv_heads * head_dim
        super().__init__(hidden, [num_heads * head_dim, local_kv * tp.size, local_kv * tp.size], bias, tp)

    def _shard(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: str):
        q_size = self.num_local_heads * self.head_dim
        kv_size = self.num_local_kv_heads * self.head_dim
        if shard_id == "q":
            return param.narrow(0, 0, q_size), loaded.narrow(0, self.tp.rank * q_size, q_size)
        offset = q_size if shard_id == "k" else q_size + kv_size
        start = self.kv_head_start * self.head_dim
        return param.narrow(0, offset, kv_size), loaded.narrow(0, start, kv_size)


class RowParallelLinear(nn.Module):
    """``y = x Wᵀ + b`` with the input features split across ranks and the partial sums all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallelGroup) -> None:
        super().__init__()
        if in_features % tp.size:
            raise ValueError(f"input size {in_features} is not divisible by tensor_parallel_size {tp.size}")
        self.tp = tp
        self.local_in = in_features // tp.size
        self.weight = nn.Parameter(torch.empty(out_features, self.local_in))
        self.weight.shard_loader = self._shard_weight
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def _shard_weight(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None):
        return param, loaded.narrow(-1, self.tp.rank * self.local_in, self.local_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary rows split across ranks."""

    def __init__(self, vocab_size: int, hidden: int, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // tp.size)
        self.row_start = tp.rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden))
        self.weight.shard_loader = self._shard

    def _shard(self, param: torch.Tensor, loaded: torch.Tensor, shard_id=None):
        rows = max(0, min(self.rows_per_rank, self.vocab_size - self.row_start))
        param.data[rows:].zero_()
        return param.narrow(0, 0, rows), loaded.narrow(0, self.row_start, rows)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.row_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        embedded = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(embedded.masked_fill(outside[:, None], 0.0))


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to the vocabulary, split like the embedding; logits gathered whole."""

    def forward(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The logits [rows, vocab]; on one rank they may be written into ``out`` (a CUDA graph's buffer)."""
        if out is not None:
            if self.tp.size != 1:
                raise ValueError("the LM head writes into `out` only on a single rank")
            return torch.mm(hidden, self.weight.t(), out=out)
        logits = self.tp.all_gather_last_dim(linear(hidden, self.weight))
        return logits[..., : self.vocab_size]
