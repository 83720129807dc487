"""EngineConfig: everything that shapes an engine instance, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flywheel.engine.checkpoint_folder import checkpoint_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str = field(
        metadata={"help": "A Hugging Face checkpoint folder (config, safetensors, tokenizer) or hub id (fetched "
                          "into the Hugging Face cache when it is not there)."}
    )
    revision: str | None = field(
        default=None, metadata={"help": "Revision (branch, tag or commit) of a hub id; a folder is read as it is."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Let the checkpoint's own code define its tokenizer and configuration (the model itself is "
                          "always one of the engine's architectures)."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "float32, bfloat16, float16, or auto (float32 on CPU, the checkpoint's dtype or bfloat16 on GPU)."},
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda or cuda:N; default cuda when available."})
    max_model_len: int | None = field(
        default=None, metadata={"help": "Longest prompt + completion in tokens; default the model's context length."}
    )
    block_size: int = field(default=16, metadata={"help": "Tokens per KV-cache block."})
    enable_prefix_caching: bool = field(
        default=True, metadata={"help": "Reuse the KV cache of prompt prefixes seen before."}
    )
    enforce_eager: bool = field(default=False, metadata={"help": "Disable CUDA graphs (GPU only)."})
    gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "Fraction of GPU memory the engine may use, weights and KV cache included."}
    )
    kv_cache_memory_gb: float | None = field(
        default=None, metadata={"help": "KV-cache size in GiB (CPU default 1; on GPU overrides gpu_memory_utilization)."}
    )
    num_kv_blocks: int | None = field(default=None, metadata={"help": "Exact number of KV-cache blocks (testing)."})
    max_num_seqs: int = field(default=256, metadata={"help": "Most sequences in one batch."})
    max_num_batched_tokens: int | None = field(
        default=None, metadata={"help": "Token budget of one prefill step; default max(8192, max_model_len)."}
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "Processes (GPUs) the model is sharded over."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampler for requests that give no seed."})
    load_format: str = field(
        default="safetensors",
        metadata={"help": "safetensors (the checkpoint's weights) or dummy (random weights of the right shapes, for benchmarks)."},
    )

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.load_format not in ("safetensors", "dummy"):
            raise ValueError(f"load_format must be 'safetensors' or 'dummy', got {self.load_format!r}")
        if self.device is None:
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = checkpoint_folder(self.model, self.revision)

    @property
    def on_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def torch_dtype(self, checkpoint_dtype: torch.dtype | None) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if not self.on_cuda:
            return torch.float32
        if checkpoint_dtype in (torch.bfloat16, torch.float16):
            return checkpoint_dtype
        return torch.bfloat16
