"""flywheel: online RL post-training (GRPO, Online DPO) with a fast generation engine of its own."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "LLM": "flywheel.engine.llm",
    "SamplingParams": "flywheel.engine.sampling",
    "RequestOutput": "flywheel.engine.outputs",
    "CompletionOutput": "flywheel.engine.outputs",
    "GenerationClient": "flywheel.client",
    "GRPOConfig": "flywheel.trainer.grpo_config",
    "GRPOTrainer": "flywheel.trainer.grpo_trainer",
    "OnlineDPOConfig": "flywheel.trainer.online_dpo_config",
    "OnlineDPOTrainer": "flywheel.trainer.online_dpo_trainer",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    # Imported on first use so that `import flywheel` stays cheap (the server and CLI import less).
    if name not in _PUBLIC:
        raise AttributeError(f"module 'flywheel' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
