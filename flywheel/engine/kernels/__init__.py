"""Triton kernels of the engine's GPU path; importing this package needs triton (CUDA machines only)."""

import sys
from types import ModuleType

from flywheel.engine.kernels.cache import store_kv
from flywheel.engine.kernels.fused import (
    fused_add_rms_norm,
    rms_norm,
    rope_cos_sin_cache,
    rotary_embedding,
    silu_and_mul,
)
from flywheel.engine.kernels.paged_attention import decode_attention, decode_num_splits, prefill_attention
from flywheel.engine.kernels.sampling import draw_tokens


def backend() -> ModuleType:
    """This package as an attention backend: ``store_kv``, ``prefill_attention``, ``decode_attention``,
    the same functions as ``flywheel.engine.attention``."""
    return sys.modules[__name__]


__all__ = [
    "backend",
    "decode_attention",
    "decode_num_splits",
    "draw_tokens",
    "fused_add_rms_norm",
    "prefill_attention",
    "rms_norm",
    "rope_cos_sin_cache",
    "rotary_embedding",
    "silu_and_mul",
    "store_kv",
]
