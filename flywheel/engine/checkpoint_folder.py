"""Where a model's files are: a local folder as given, or the snapshot of a Hugging Face hub id."""

from __future__ import annotations

import os

# What the engine reads: config, weights, tokenizer and chat template files.
_ENGINE_FILES = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.tiktoken", "*.txt"]


def checkpoint_folder(model: str, revision: str | None = None) -> str:
    """`model` when it is a folder (`revision` does not apply); else the folder of hub id `model` at `revision`
    in the Hugging Face cache, fetched into it when missing (unless HF_HUB_OFFLINE is set)."""
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model, revision=revision, allow_patterns=_ENGINE_FILES)
    except Exception as error:
        at = f" at revision {revision!r}" if revision else ""
        raise ValueError(f"model: {model!r} is not a folder, and the Hugging Face hub id could not be found{at} "
                         f"in the cache or fetched ({type(error).__name__}: {error})") from error
