"""Maps a checkpoint's ``architectures`` entry to the native model class."""

from __future__ import annotations

from flywheel.engine.models.qwen2 import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

MODELS = {
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
}


def model_class(config) -> type:
    architectures = getattr(config, "architectures", None) or []
    for name in architectures:
        if name in MODELS:
            return MODELS[name]
    raise ValueError(
        f"unsupported model architecture {architectures or '(none given)'}; supported: {', '.join(MODELS)}"
    )
