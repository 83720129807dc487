"""Tiny random-weight Hugging Face checkpoints and a byte-level tokenizer, for tests and the demo.

Nothing here downloads anything: the tokenizer is built with the `tokenizers` library and the
checkpoints are written from a transformers config with random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ARCHITECTURES = ("qwen2", "qwen3", "llama")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: one token per byte (ids 0-255), then the special tokens."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    byte_chars.sort(key=lambda ch: _byte_of_char()[ch])
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def _byte_of_char() -> dict[str, int]:
    # GPT-2's printable stand-in for every byte, inverted.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def tiny_config(
    architecture: str = "qwen2",
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 272,
    tie_word_embeddings: bool = True,
    max_position_embeddings: int = 1024,
    head_dim: int | None = None,
    **fields,
):
    """A transformers config for a tiny model of the given architecture (qwen2, qwen3 or llama); `fields` are
    further config fields (attention_bias, use_sliding_window, ...)."""
    tokenizer_ids = {"bos_token_id": 256, "eos_token_id": 258, "pad_token_id": 256}
    common = dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        **tokenizer_ids,
    )
    common.update(fields)
    if architecture == "qwen2":
        return Qwen2Config(**common)
    if architecture == "qwen3":
        return Qwen3Config(head_dim=head_dim or 2 * hidden_size // num_attention_heads, **common)
    if architecture == "llama":
        return LlamaConfig(**{"attention_bias": False, "mlp_bias": False, **common})
    raise ValueError(f"unknown architecture {architecture!r}; choose one of {ARCHITECTURES}")


def write_tiny_checkpoint(path: str | Path, architecture: str = "qwen2", *, seed: int = 0, **config_overrides) -> Path:
    """Write a random-weight checkpoint (safetensors, config, tokenizer) to `path` and return it."""
    path = Path(path)
    config = tiny_config(architecture, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _spread_weights(model, seed)
    model.save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    return path


def _spread_weights(model: torch.nn.Module, seed: int) -> None:
    # transformers initialises with std 0.02, which makes every logit nearly equal and greedy
    # decoding a coin toss between ties; wider weights give distinct, decisive logits.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param.shape[-1] if param.dim() > 1 else 1
                scale = 1.0 / fan_in**0.5 if param.dim() > 1 else 0.02
                param.copy_(scale * torch.randn(param.shape, generator=generator))
