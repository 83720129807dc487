"""The decoder of Qwen2 checkpoints; Llama (no biases) and Qwen3 (q/k norms) are variants of it."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from flywheel.engine.distributed import TensorParallelGroup
from flywheel.engine.forward_context import ForwardContext
from flywheel.engine.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    silu_and_mul,
)


def rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or parameters
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type != "default":
        raise ValueError(f"rope type {rope_type!r} is not supported yet; supported: default")
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def check_full_attention(config) -> None:
    """Refuse a config with sliding-window layers: every layer here attends to the whole sequence."""
    layer_types = getattr(config, "layer_types", None) or []
    windowed = sorted({kind for kind in layer_types if kind != "full_attention"})
    if windowed or (not layer_types and getattr(config, "use_sliding_window", False)):
        raise ValueError(f"attention of type {windowed or ['sliding_attention']} is not supported yet; every layer "
                         "must be full attention (use_sliding_window=false)")


class Attention(nn.Module):
    def __init__(self, config, tp: TensorParallelGroup, rotary: RotaryEmbedding, bias: bool, output_bias: bool,
                 qk_norm: bool) -> None:
        super().__init__()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, config.num_attention_heads, config.num_key_value_heads, bias, tp
        )
        self.num_heads = self.qkv_proj.num_local_heads
        self.num_kv_heads = self.qkv_proj.num_local_kv_heads
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size, output_bias, tp)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary = rotary
        self.scale = self.head_dim**-0.5

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, context: ForwardContext, layer: int) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(hidden).split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = context.attend(layer, q, k, v, self.scale)
        return self.o_proj(out.reshape(num_tokens, q_size))


class MLP(nn.Module):
    def __init__(self, config, tp: TensorParallelGroup) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = ColumnParallelLinear(
            config.hidden_size, [config.intermediate_size, config.intermediate_size], bias, tp
        )
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config, tp, rotary, bias: bool, output_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = Attention(config, tp, rotary, bias, output_bias, qk_norm)
        self.mlp = MLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden, residual, context: ForwardContext, layer: int):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, context, layer)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Qwen2ForCausalLM(nn.Module):
    """Qwen2: biases on the q, k and v projections."""

    attention_bias = True
    qk_norm = False
    # HF parameter name piece -> (our fused parameter name piece, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.config = config
        check_full_attention(config)
        bias = self._attention_bias(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotary = RotaryEmbedding(head_dim, config.max_position_embeddings, rope_theta(config))
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(
            DecoderLayer(config, tp, rotary, bias, self._output_bias(config), self.qk_norm)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _attention_bias(self, config) -> bool:
        """Whether the q, k and v projections have biases."""
        return self.attention_bias

    def _output_bias(self, config) -> bool:
        """Whether the attention's output projection has a bias."""
        return False

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, context: ForwardContext) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for index, layer in enumerate(self.layers):
            hidden, residual = layer(positions, hidden, residual, context, index)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(hidden, out)

    def parameter_for(self, hf_name: str) -> tuple[str, str | int | None]:
        """Our parameter name and shard id for a Hugging Face parameter name."""
        name = hf_name.removeprefix("model.")
        for piece, (fused, shard_id) in self.packed_modules.items():
            if f".{piece}." in name:
                return name.replace(f".{piece}.", f".{fused}."), shard_id
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        from flywheel.engine.weights import load_named_weights

        load_named_weights(self, weights)


class LlamaForCausalLM(Qwen2ForCausalLM):
    """Llama: Qwen2's graph, biases only where the config asks for them."""

    def _attention_bias(self, config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def _output_bias(self, config) -> bool:
        return self._attention_bias(config)  # transformers gives o_proj the bias too


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: per-head RMS norms on queries and keys, an explicit head_dim."""

    qk_norm = True
