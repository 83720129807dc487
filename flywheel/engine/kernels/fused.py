"""Fused elementwise Triton kernels of the decoder layer: RMSNorm (with residual add), SiLU-and-mul, rotary.

Each computes in fp32 and rounds once to the input dtype (fp32, bf16 or fp16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
    stride_x, stride_r, stride_o, stride_nr,
    n_cols, eps,
    ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # Rounded to the model dtype first, as the unfused layer keeps the residual stream.
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(new_residual_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * stride_nr + cols, x, mask=mask)
    x = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (x * inv_rms * weight).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_heads(x_ptr, token, stride_t, stride_h, num_heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HALF)
    first = x_ptr + token * stride_t + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos[None, :] - x2 * sin[None, :]).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0)
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + position * stride_cos + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + position * stride_sin + dims, mask=dims < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, token, stride_qt, stride_qh, num_q_heads, cos, sin, HALF, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k_ptr, token, stride_kt, stride_kh, num_k_heads, cos, sin, HALF, BLOCK_KH, BLOCK_HALF)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, last_dim]`` with a contiguous last dimension (a view where possible)."""
    return x.reshape(-1, x.shape[-1]) if x.stride(-1) == 1 else x.contiguous().view(-1, x.shape[-1])


def _norm_warps(n_cols: int) -> int:
    return min(16, max(1, triton.next_power_of_2(n_cols) // 256))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x**2, -1) + eps) * weight`` over the last dimension; same shape and dtype as ``x``."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be [{x.shape[-1]}] (x's last dimension), got {tuple(weight.shape)}")
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        n_cols = rows.shape[1]
        _rms_norm_kernel[(rows.shape[0],)](
            rows, rows, weight, out, out, rows.stride(0), rows.stride(0), out.stride(0), out.stride(0), n_cols, eps,
            ADD_RESIDUAL=False, BLOCK=triton.next_power_of_2(n_cols), num_warps=_norm_warps(n_cols),
        )
    return out.view(x.shape)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_residual = x + residual`` and ``rms_norm(new_residual)`` in one pass; returns ``(normed, new_residual)``."""
    if x.shape != residual.shape:
        raise ValueError(f"x and residual must have one shape, got {tuple(x.shape)} and {tuple(residual.shape)}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be [{x.shape[-1]}] (x's last dimension), got {tuple(weight.shape)}")
    rows, residual_rows = _rows(x), _rows(residual)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    new_residual = torch.empty(rows.shape, dtype=residual.dtype, device=x.device)
    if rows.shape[0]:
        n_cols = rows.shape[1]
        _rms_norm_kernel[(rows.shape[0],)](
            rows, residual_rows, weight, out, new_residual,
            rows.stride(0), residual_rows.stride(0), out.stride(0), new_residual.stride(0), n_cols, eps,
            ADD_RESIDUAL=True, BLOCK=triton.next_power_of_2(n_cols), num_warps=_norm_warps(n_cols),
        )
    return out.view(x.shape), new_residual.view(x.shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``x = [gate | up]`` along the last dimension → ``silu(gate) * up`` (half as wide)."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension ([gate | up]), got {x.shape[-1]}")
    rows = _rows(x)
    n_cols = rows.shape[1] // 2
    out = torch.empty((rows.shape[0], n_cols), dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block = min(1024, triton.next_power_of_2(n_cols))
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(n_cols, block))](
            rows, out, rows.stride(0), out.stride(0), n_cols, BLOCK=block, num_warps=4,
        )
    return out.view(*x.shape[:-1], n_cols)


def rope_cos_sin_cache(
    head_dim: int, max_position: int, base: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """The default (unscaled) rotary table ``[max_position, head_dim]``: cos in the first half, sin in the second."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    freqs = torch.arange(max_position, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()


def _as_heads(x: torch.Tensor, head_dim: int, name: str) -> torch.Tensor:
    if x.dim() == 2:
        if x.shape[1] % head_dim:
            raise ValueError(f"{name} [T, heads*head_dim] width {x.shape[1]} is not a multiple of head_dim {head_dim}")
        x = x.view(x.shape[0], -1, head_dim)
    if x.dim() != 3 or x.shape[2] != head_dim or x.stride(2) != 1:
        raise ValueError(f"{name} must be [T, heads, {head_dim}] or [T, heads*{head_dim}] with contiguous rows")
    return x


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    head_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` in place, NeoX/HF half-rotation style (``x*cos + rotate_half(x)*sin``).

    ``q`` ``[T, heads, D]`` or ``[T, heads*D]``, ``k`` likewise (strided views of a fused qkv output are
    fine), ``positions`` ``[T]``. ``cos_sin_cache`` is ``[max_position, D]`` (cos in the first half, sin
    in the second, as from ``rope_cos_sin_cache``) or a pair ``(cos, sin)`` of ``[max_position, D/2]``.
    Returns ``(q, k)``.
    """
    half = head_dim // 2
    cos, sin = cos_sin_cache if isinstance(cos_sin_cache, tuple) else cos_sin_cache.split(half, dim=-1)
    if head_dim % 2 or cos.shape[-1] != half or sin.shape != cos.shape or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError(
            f"head_dim must be even and the rotary table hold head_dim/2 = {half} contiguous cos and sin "
            f"values per position, got head_dim {head_dim}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    q_heads, k_heads = _as_heads(q, head_dim, "q"), _as_heads(k, head_dim, "k")
    if positions.shape != (q_heads.shape[0],) or k_heads.shape[0] != q_heads.shape[0]:
        raise ValueError(
            f"positions [T], q and k must agree on T, got {tuple(positions.shape)}, {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if q_heads.shape[0]:
        _rotary_kernel[(q_heads.shape[0],)](
            positions, q_heads, k_heads, cos, sin,
            q_heads.stride(0), q_heads.stride(1), k_heads.stride(0), k_heads.stride(1), cos.stride(0), sin.stride(0),
            q_heads.shape[1], k_heads.shape[1],
            HALF=half, BLOCK_QH=triton.next_power_of_2(q_heads.shape[1]),
            BLOCK_KH=triton.next_power_of_2(k_heads.shape[1]), BLOCK_HALF=triton.next_power_of_2(half),
            num_warps=4,
        )
    return q, k
