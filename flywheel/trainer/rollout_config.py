"""Training arguments shared by the online trainers: sampling and where rollouts are generated."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from flywheel.engine.sampling import repetition_penalty_problem

VLLM_MODES = ("server", "colocate")


@dataclass
class RolloutTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the sampling and rollout-placement fields GRPO and Online DPO share.

    The `vllm_*` names are those TRL users know; the engine behind them is flywheel's own.
    """

    # Defaults that differ from `TrainingArguments`.
    learning_rate: float = field(default=1e-6, metadata={"help": "Initial learning rate of AdamW."})
    logging_steps: float = field(
        default=10,
        metadata={"help": "Log every X optimizer steps (an integer, or a float in (0, 1) as a ratio of all steps)."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Kept False: every dataset column besides `prompt` is handed to the reward functions, so none "
            "may be dropped."
        },
    )

    # Model.
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `AutoModelForCausalLM.from_pretrained` when `model` is a path "
            "(e.g. {'dtype': 'bfloat16'}); dtype defaults to 'auto'."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Let a checkpoint loaded from a path (the model, its tokenizer, the reference model) run the "
            "modeling code it ships; only for checkpoints whose code you trust. A 'trust_remote_code' in "
            "model_init_kwargs takes precedence for the model. The engine runs only its own architectures."
        },
    )
    cast_lm_head_to_fp32: bool = field(
        default=False,
        metadata={
            "help": "Compute the language-modeling head of the trained and reference models in float32 (its "
            "weights in float32, its input cast, outside autocast), so that the logprobs come from float32 logits, "
            "as ScaleRL recommends. Needs a head of its own: models that tie it to the input embeddings are "
            "refused. The engine's head stays in the engine's dtype."
        },
    )
    disable_dropout: bool = field(
        default=False,
        metadata={
            "help": "Set every dropout of the trained (and reference) model to 0, attention dropout included, so "
            "that the trainer's logprobs of a completion are the same in every forward."
        },
    )
    pack_prompts: bool = field(
        default=False,
        metadata={
            "help": "Run each prompt once for all its completions in the training forward: a batch becomes one "
            "sequence of its distinct prompts and every completion, and attention splits it back (the "
            "'flywheel_packed' attention, given to an sdpa model with full attention; sdpa for its other forwards). "
            "On a GPU in half precision attention is one variable-length flash call per layer. The longer the "
            "prompts against their completions, the more tokens it saves: at 128-token prompts and 256-token "
            "completions, an H200's compiled qwen2.5-0.5b GRPO step took 12% less time beyond its generation, in "
            "8 GiB less memory. Without it the CPU shares a prompt's forward through a cache (as fast there), except "
            "under gradient checkpointing."
        },
    )

    # Sampling.
    max_prompt_length: int | None = field(
        default=512,
        metadata={"help": "Prompts longer than this keep their last tokens (left truncation). None: no limit."},
    )
    max_completion_length: int = field(default=256, metadata={"help": "Most tokens generated per completion."})
    temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature (> 0); the trainer's logprobs use the same temperature."},
    )
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus sampling: keep the smallest set of tokens of mass top_p."}
    )
    top_k: int | None = field(
        default=0, metadata={"help": "Keep only the k most likely tokens; 0, -1 or None disables."}
    )
    min_p: float | None = field(
        default=0.0,
        metadata={"help": "Drop tokens whose probability is below min_p times the top token's; 0 or None disables."},
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata={"help": "Penalty (> 0) for tokens already in the prompt or completion; 1.0 disables."},
    )
    chat_template_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Further keyword arguments for the chat template that renders conversational prompts, e.g. "
            "{'enable_thinking': False} for Qwen3's template."
        },
    )
    generation_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Further sampling arguments: SamplingParams fields for the engine, or `generate` arguments "
            "when use_vllm=False. They override the fields above; n and logprobs are the rollout's own."
        },
    )

    # Rollout placement.
    use_vllm: bool = field(
        default=False,
        metadata={
            "help": "Generate with flywheel's engine (server or colocated, see vllm_mode) instead of "
            "transformers `generate`."
        },
    )
    vllm_mode: str = field(
        default="server",
        metadata={
            "help": "'server': a separate `flywheel serve` process generates, weights are pushed to it over a "
            "collective group. 'colocate': an engine lives in each training process and shares its device."
        },
    )
    vllm_server_base_url: str | None = field(
        default=None,
        metadata={"help": "Base URL of the server (e.g. 'http://10.0.0.5:8000'); overrides host and port."},
    )
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Host of the generation server."})
    vllm_server_port: int = field(default=8000, metadata={"help": "HTTP port of the generation server."})
    vllm_server_timeout: float = field(
        default=240.0,
        metadata={"help": "Seconds to wait for the server to answer /health before giving up."},
    )
    vllm_group_port: int = field(
        default=51216,
        metadata={"help": "Port of the weight-sync collective group between the trainer and the server."},
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata={"help": "Colocate: fraction of the device memory the engine may take (weights + KV cache)."},
    )
    vllm_tensor_parallel_size: int = field(
        default=1,
        metadata={"help": "Colocate: tensor-parallel size of the engine (1 when several training processes run)."},
    )
    vllm_kv_cache_memory_gb: float | None = field(
        default=None,
        metadata={"help": "Colocate: KV-cache size in GiB; on a GPU it takes the place of "
                          "vllm_gpu_memory_utilization's share (default: 1 on the CPU, that share on a GPU)."},
    )
    vllm_max_model_length: int | None = field(
        default=None,
        metadata={
            "help": "Colocate: the engine's context window (max_model_len); at least the longest prompt plus "
            "max_completion_length. Default: max_prompt_length + max_completion_length, or the model config's "
            "when max_prompt_length is None."
        },
    )
    vllm_enable_sleep_mode: bool = field(
        default=False,
        metadata={"help": "Colocate: free the engine's KV cache while training and re-allocate it before generating."},
    )

    @property
    def completions_per_rollout(self) -> int:
        """Completions one process asks for in one generation (a colocated engine runs them in one batch)."""
        return self.per_device_train_batch_size

    def __post_init__(self) -> None:
        if not self.use_cpu and not torch.cuda.is_available() and not torch.backends.mps.is_available():
            # On a machine without an accelerator: without use_cpu, accelerate would run each of
            # several launched processes alone instead of DDP over Gloo, and bf16 would be refused.
            self.use_cpu = True
        super().__post_init__()
        # Reward functions need the extra columns; the Trainer's column pruning would drop them.
        self.remove_unused_columns = False
        # Dict fields arrive as JSON text from the command line.
        for name in ("model_init_kwargs", "chat_template_kwargs", "generation_kwargs"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, json.loads(getattr(self, name)))
        # TRL's configs write "disabled" as None for these two.
        self.top_k = 0 if self.top_k is None else self.top_k
        self.min_p = 0.0 if self.min_p is None else self.min_p
        reserved = sorted({"n", "logprobs"} & set(self.generation_kwargs or {}))
        if reserved:
            raise ValueError(f"generation_kwargs cannot set {', '.join(reserved)}: the rollout samples num_generations "
                             "completions per prompt, one request each, and asks for the sampled tokens' logprobs")
        if self.vllm_mode not in VLLM_MODES:
            raise ValueError(f"vllm_mode must be one of {VLLM_MODES}, got {self.vllm_mode!r}")
        if self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1 or None, got {self.max_prompt_length}")
        self._check_vllm_max_model_length()
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (the trainer divides logits by it), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= -1 (0 or -1 disables), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        problem = repetition_penalty_problem(self.repetition_penalty)
        if problem is not None:
            raise ValueError(problem)
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.vllm_tensor_parallel_size < 1:
            raise ValueError(f"vllm_tensor_parallel_size must be >= 1, got {self.vllm_tensor_parallel_size}")
        colocated = self.use_vllm and self.vllm_mode == "colocate"
        if colocated and self.vllm_tensor_parallel_size > 1 and self.world_size > 1:
            raise ValueError(
                "vllm_tensor_parallel_size > 1 in colocate mode needs a single training process; "
                f"got {self.world_size} processes. Use vllm_mode='server' for a tensor-parallel engine."
            )

    def _check_vllm_max_model_length(self) -> None:
        """The engine's context window must hold the longest prompt (one token when unlimited) and completion."""
        if self.vllm_max_model_length is None:
            return
        prompt = 1 if self.max_prompt_length is None else self.max_prompt_length
        longest = prompt + self.max_completion_length
        if longest > self.vllm_max_model_length:
            raise ValueError(
                f"vllm_max_model_length={self.vllm_max_model_length} has no room for a {prompt}-token prompt "
                f"(max_prompt_length={self.max_prompt_length}) and {self.max_completion_length} completion tokens "
                f"(max_completion_length): raise it to {longest} or more, or lower max_prompt_length or "
                "max_completion_length")
