"""The server's options: one dataclass, parsed from the command line (both `_` and `-` spellings)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import HfArgumentParser

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
KV_CACHE_DTYPES = ("auto",)
MODEL_IMPLS = ("auto", "vllm")
DEFAULT_MAX_N = 256


@dataclass
class ServerOptions:
    """Options of `flywheel serve` (the names of TRL's `vllm-serve`, plus what serving safely needs)."""

    model: str = field(metadata={"help": "Path or Hugging Face id of the model to serve."})
    revision: str | None = field(default=None, metadata={"help": "Model revision (branch, tag or commit)."})
    tensor_parallel_size: int = field(
        default=1, metadata={"help": "Processes (GPUs) per engine; the layers are sharded across them."}
    )
    data_parallel_size: int = field(
        default=1, metadata={"help": "Independent engines; a request's prompts are spread across them."}
    )
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "Address to listen on. Use 0.0.0.0 only on a trusted network (see --api_key)."},
    )
    port: int = field(default=8000, metadata={"help": "HTTP port."})
    gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "Fraction of each GPU's memory the engine may use (weights + KV cache)."}
    )
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto, float32, bfloat16 or float16."})
    kv_cache_dtype: str = field(
        default="auto", metadata={"help": "KV-cache dtype: auto (the weights' dtype), the only one this engine has."}
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Let the checkpoint's own code define its tokenizer and configuration (the model itself is "
                          "always one of the engine's architectures)."},
    )
    vllm_model_impl: str = field(
        default="vllm",
        metadata={"help": "Model implementation: vllm or auto, both the engine's own (Qwen2, Qwen3, Llama); "
                          "transformers' modelling code is not run."},
    )
    max_model_len: int | None = field(
        default=None, metadata={"help": "Longest prompt + completion in tokens (default: the model's limit)."}
    )
    enable_prefix_caching: bool = field(default=True, metadata={"help": "Reuse the KV cache of shared prefixes."})
    enforce_eager: bool = field(default=False, metadata={"help": "Disable CUDA graphs (eager PyTorch only)."})
    kv_cache_memory_gb: float | None = field(
        default=None, metadata={"help": "KV-cache size in GiB per engine on the CPU (default: the engine's)."}
    )
    max_num_seqs: int = field(default=256, metadata={"help": "Most sequences one engine runs at once."})
    seed: int = field(
        default=0, metadata={"help": "Engine seed; data-parallel engine i uses seed + i (requests may carry their own)."}
    )
    log_level: str = field(default="info", metadata={"help": f"Logging level: {', '.join(LOG_LEVELS)}."})
    api_key: str | None = field(
        default=None,
        metadata={"help": "Require `Authorization: Bearer KEY` on every endpoint, /health included "
                          "(default: the FLYWHEEL_API_KEY environment variable, else no key)."},
    )
    max_request_mb: float = field(default=128.0, metadata={"help": "Largest request body in MiB (413 beyond)."})
    max_prompts_per_request: int = field(default=4096, metadata={"help": "Most prompts in one request."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Longest prompt in tokens (default: max_model_len - 1)."}
    )
    max_tokens_limit: int | None = field(
        default=None, metadata={"help": "Largest max_tokens a request may ask for (default: no extra limit)."}
    )
    max_n: int = field(
        default=DEFAULT_MAX_N, metadata={"help": "Largest n (completions per prompt) a request may ask for."}
    )
    request_timeout: float = field(
        default=600.0, metadata={"help": "Seconds a generation request may run before it is aborted (504)."}
    )
    startup_timeout: float = field(default=900.0, metadata={"help": "Seconds the engines may take to load."})
    communicator_timeout: float = field(
        default=120.0, metadata={"help": "Seconds any weight-sync rendezvous, broadcast or barrier may wait."}
    )

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get("FLYWHEEL_API_KEY") or None
        checks = [
            (self.tensor_parallel_size >= 1, f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}"),
            (self.data_parallel_size >= 1, f"data_parallel_size must be >= 1, got {self.data_parallel_size}"),
            (0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}"),
            (0.0 < self.gpu_memory_utilization <= 1.0,
             f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"),
             f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}"),
            (self.kv_cache_dtype in KV_CACHE_DTYPES,
             f"kv_cache_dtype must be auto (the cache holds the weights' dtype), got {self.kv_cache_dtype!r}"),
            (self.vllm_model_impl in MODEL_IMPLS,
             f"vllm_model_impl must be vllm or auto (the engine's own models), got {self.vllm_model_impl!r}"),
            (self.log_level.lower() in LOG_LEVELS, f"log_level must be one of {LOG_LEVELS}, got {self.log_level!r}"),
            (self.max_prompts_per_request >= 1,
             f"max_prompts_per_request must be >= 1, got {self.max_prompts_per_request}"),
            (self.max_request_mb > 0, f"max_request_mb must be > 0, got {self.max_request_mb}"),
            (self.request_timeout > 0, f"request_timeout must be > 0, got {self.request_timeout}"),
            (self.communicator_timeout > 0, f"communicator_timeout must be > 0, got {self.communicator_timeout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.log_level = self.log_level.lower()

    @property
    def world_size(self) -> int:
        """Engine ranks in the weight-sync group (the client adds one)."""
        return self.tensor_parallel_size * self.data_parallel_size


def parse_options(argv: list[str]) -> ServerOptions:
    """Parse `flywheel serve` arguments; `--help` prints every option with its help text. A bad or
    unknown option is a usage error (exit code 2) that names it, as argparse gives for a bad type."""
    parser = HfArgumentParser(ServerOptions, prog="flywheel serve")
    # argparse's own parse_args: HfArgumentParser.parse_args_into_dataclasses raises a ValueError for an unknown option.
    namespace = parser.parse_args(argv)
    if not os.path.isdir(namespace.model) and not _is_hub_id(namespace.model):
        parser.error(f"argument --model: {namespace.model!r} is neither a folder nor a Hugging Face hub id (org/name)")
    try:
        return ServerOptions(**vars(namespace))
    except ValueError as error:
        parser.error(f"{error}")


def _is_hub_id(model: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True
