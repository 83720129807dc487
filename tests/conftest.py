"""Shared fixtures: tiny checkpoints written once per session; GPU tests skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from flywheel.testing import write_tiny_checkpoint


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    """Paths of tiny checkpoints: qwen2 (tied), qwen3 (tied), llama (untied), and a second qwen2."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "qwen2": str(write_tiny_checkpoint(root / "qwen2", "qwen2", seed=0)),
        "qwen3": str(write_tiny_checkpoint(root / "qwen3", "qwen3", seed=1)),
        "llama": str(write_tiny_checkpoint(root / "llama", "llama", seed=2, tie_word_embeddings=False)),
        "qwen2_b": str(write_tiny_checkpoint(root / "qwen2_b", "qwen2", seed=3)),
    }


@pytest.fixture(scope="session")
def hf_models(tiny_checkpoints):
    """transformers models of the tiny checkpoints, float32, for reference outputs."""
    from transformers import AutoModelForCausalLM

    return {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval() for name, path in tiny_checkpoints.items()}


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy completion of one prompt, EOS ignored."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt_ids) :].tolist()
