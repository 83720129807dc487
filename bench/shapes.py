"""Model shapes and workloads of the benchmarks (BENCHMARKS.md), and random-weight model folders."""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

from flywheel.testing import byte_tokenizer

SHAPES = {
    # name: (config class, hidden, intermediate, layers, heads, kv heads, vocab, tied, head_dim)
    "qwen2.5-0.5b": (Qwen2Config, 896, 4864, 24, 14, 2, 151936, True, None),
    "qwen2.5-1.5b": (Qwen2Config, 1536, 8960, 28, 12, 2, 151936, True, None),
    "qwen2.5-7b": (Qwen2Config, 3584, 18944, 28, 28, 4, 152064, False, None),
    "qwen3-0.6b": (Qwen3Config, 1024, 3072, 28, 16, 8, 151936, True, 128),
    "tiny": (Qwen2Config, 256, 768, 4, 4, 2, 512, True, None),
}


@dataclass
class Workload:
    num_prompts: int
    n: int
    prompt_len: int | tuple[int, int]
    max_tokens: int | tuple[int, int]
    temperature: float = 1.0

    def requests(self, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
        """(prompt ids, max_tokens) per prompt, drawn reproducibly."""
        rng = random.Random(seed)
        high = min(vocab, 10000)
        out = []
        for _ in range(self.num_prompts):
            length = self.prompt_len if isinstance(self.prompt_len, int) else rng.randint(*self.prompt_len)
            tokens = self.max_tokens if isinstance(self.max_tokens, int) else rng.randint(*self.max_tokens)
            out.append(([rng.randrange(high) for _ in range(length)], tokens))
        return out


WORKLOADS = {
    "rollout": Workload(64, 8, 128, 256),
    "long": Workload(32, 8, 256, 2048),
    "nanovllm": Workload(256, 1, (100, 1024), (100, 1024), temperature=0.6),
    "cpu-rollout": Workload(16, 8, 128, 128),
}


def model_config(shape: str):
    cls, hidden, inter, layers, heads, kv_heads, vocab, tied, head_dim = SHAPES[shape]
    extra = {"head_dim": head_dim} if head_dim else {}
    return cls(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        max_position_embeddings=4096,
        architectures=[cls.__name__.replace("Config", "ForCausalLM")],
        **extra,
    )


def model_folder(shape: str) -> str:
    """A folder with the shape's config and a tokenizer (weights come from load_format='dummy')."""
    folder = Path(tempfile.mkdtemp(prefix=f"flywheel-{shape}-"))
    model_config(shape).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def write_checkpoint(folder: str | Path, shape: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Save a random-weight model of ``shape`` (with the byte tokenizer) to ``folder``; returns the model."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(shape), dtype=dtype)
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    return model
