"""What one forward pass needs beyond tokens and positions: where the keys and values go and
which cached positions each query attends to."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from flywheel.engine.shared_prefix import SharedPrefixLayout, decode_attention_shared_prefix, forget_kept_layout


@dataclass
class ForwardContext:
    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache after this step, per sequence
    block_tables: torch.Tensor  # [B, max_blocks] int32
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    backend: ModuleType  # flywheel.engine.attention or the Triton kernels: same functions
    cu_seqlens_q: torch.Tensor | None = None  # [B + 1] int32, prefill only
    max_seq_len: int | None = None
    max_q_len: int | None = None
    shared_prefix: SharedPrefixLayout | None = None  # decode on the PyTorch path only

    def __post_init__(self) -> None:
        if self.is_prefill:
            forget_kept_layout()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        k_cache, v_cache = self.kv_caches[layer]
        self.backend.store_kv(k, v, k_cache, v_cache, self.slot_mapping)
        if self.is_prefill:
            return self.backend.prefill_attention(
                q, k_cache, v_cache, self.cu_seqlens_q, self.seq_lens, self.block_tables, scale, max_q_len=self.max_q_len
            )
        if self.shared_prefix is not None:
            return decode_attention_shared_prefix(q, k_cache, v_cache, self.shared_prefix, scale)
        return self.backend.decode_attention(
            q, k_cache, v_cache, self.seq_lens, self.block_tables, scale, max_seq_len=self.max_seq_len
        )
