"""Rollout placements behind one interface: transformers `generate`, a colocated engine, a generation server.

Every placement turns this process's list of prompts (token ids; the same prompt repeated once per
completion wanted) into one completion per entry, in order, and keeps the generator's weights in
step with the trained model (`sync_weights` pushes only when the trainer's version changed).
"""

from __future__ import annotations

import atexit
import logging
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn
from transformers import PreTrainedTokenizerBase

from flywheel.server.options import DEFAULT_MAX_N
from flywheel.trainer.batching import left_pad
from flywheel.trainer.prompts import prompt_runs
from flywheel.trainer.rollout_config import RolloutTrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class SamplingSettings:
    """What every placement samples with (built from the trainer's arguments)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    generation_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_args(cls, args: RolloutTrainingArguments) -> SamplingSettings:
        return cls(max_tokens=args.max_completion_length, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                   generation_kwargs=dict(args.generation_kwargs or {}))


@dataclass
class RolloutOutput:
    """One completion per prompt entry: token ids, the generator's logprob of each token, truncation."""

    completion_ids: list[list[int]]
    logprobs: list[Sequence[float]] | None  # lists, or C arrays of doubles
    truncated: list[bool]


class Rollout(ABC):
    """A place where completions are generated."""

    def __init__(self) -> None:
        self.synced_version: int | None = None

    @abstractmethod
    def generate(self, prompt_ids: list[list[int]]) -> RolloutOutput:
        """One completion per entry of `prompt_ids` (this process's share), in order."""

    def sync_weights(self, model: nn.Module, version: int) -> bool:
        """Push `model`'s weights if `version` differs from the last pushed one; True when it pushed."""
        if version == self.synced_version:
            return False
        self._push_weights(model)
        self.synced_version = version
        return True

    def _push_weights(self, model: nn.Module) -> None:
        """Copy the weights to the generator (nothing to do when the trained model generates itself)."""

    def sleep(self) -> None:
        """Release generation memory while the trainer trains."""

    def wake_up(self) -> None:
        """Re-acquire generation memory before generating."""

    def finish_training(self) -> None:
        """Training ended: release what only weight pushes need (a later push takes it again)."""

    def close(self) -> None:
        """Release connections and processes."""


class TransformersRollout(Rollout):
    """`use_vllm=False`: the trained model samples with transformers `generate` (left-padded batches)."""

    def __init__(self, model: nn.Module, settings: SamplingSettings, pad_token_id: int, eos_token_ids: list[int],
                 device: torch.device, batch_size: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.settings = settings
        self.pad_token_id = pad_token_id
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.batch_size = batch_size

    def generate(self, prompt_ids: list[list[int]]) -> RolloutOutput:
        step = self.batch_size or max(len(prompt_ids), 1)
        completions: list[list[int]] = []
        truncated: list[bool] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(prompt_ids), step):
                chunk_ids, chunk_truncated = self._generate_chunk(prompt_ids[start : start + step])
                completions += chunk_ids
                truncated += chunk_truncated
        finally:
            self.model.train(was_training)
        return RolloutOutput(completions, None, truncated)

    @torch.no_grad()
    def _generate_chunk(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[bool]]:
        input_ids, attention_mask = left_pad(prompt_ids, self.pad_token_id, self.device)
        s = self.settings
        # Every field spelled out: left unset, `generate` would take the checkpoint's generation_config
        # (Qwen ships top_k=20, top_p=0.8, ...) and sample from another distribution than the trainer scores.
        options = dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=max(s.top_k, 0),
                       min_p=s.min_p, repetition_penalty=s.repetition_penalty, max_new_tokens=s.max_tokens,
                       pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_ids, use_cache=True)
        output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                     **{**options, **s.generation_kwargs})
        completions, truncated = [], []
        for row in output[:, input_ids.size(1):].tolist():
            end = next((i for i, token in enumerate(row) if token in self.eos_token_ids), None)
            completions.append(row if end is None else row[: end + 1])
            truncated.append(end is None)
        return completions, truncated


class ColocateRollout(Rollout):
    """`vllm_mode="colocate"`: a flywheel `LLM` in this process, on this process's device.

    Weights move by a device copy (`LLM.load_weights`); with sleep mode the KV cache is released
    while training and re-allocated before generating.
    """

    def __init__(self, model: nn.Module, model_path: str | None, processing_class: PreTrainedTokenizerBase,
                 args: RolloutTrainingArguments, settings: SamplingSettings, accelerator: Accelerator) -> None:
        super().__init__()
        from flywheel import LLM

        self.settings = settings
        self.enable_sleep = args.vllm_enable_sleep_mode
        self._tmpdir = None
        if model_path is None:
            model_path, self._tmpdir = _checkpoint_path(model, processing_class)
        model_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        dtype = "bfloat16" if args.bf16 else "float16" if args.fp16 else model_dtype
        self.llm = LLM(
            model=model_path, trust_remote_code=args.trust_remote_code, dtype=dtype, device=str(accelerator.device),
            max_model_len=_max_model_len(args),
            gpu_memory_utilization=args.vllm_gpu_memory_utilization, kv_cache_memory_gb=args.vllm_kv_cache_memory_gb,
            tensor_parallel_size=args.vllm_tensor_parallel_size, seed=args.seed + accelerator.process_index,
            max_num_seqs=max(256, args.completions_per_rollout),
        )
        self.sleep()

    def generate(self, prompt_ids: list[list[int]]) -> RolloutOutput:
        from flywheel import SamplingParams

        runs = prompt_runs(prompt_ids)
        s = self.settings
        # The trainer decodes completions itself; the engine needs their text only to match stop strings.
        options = dict(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
                       repetition_penalty=s.repetition_penalty, max_tokens=s.max_tokens,
                       detokenize=bool(s.generation_kwargs.get("stop")))
        params = [SamplingParams(n=count, logprobs=0, **{**options, **s.generation_kwargs}) for _, count in runs]
        outputs = self.llm.generate([ids for ids, _ in runs], params, use_tqdm=False)
        completions = [completion for output in outputs for completion in output.outputs]
        return RolloutOutput(
            completion_ids=[c.token_ids for c in completions],  # each already a list of its own
            logprobs=[c.logprobs.sampled for c in completions],
            truncated=[c.finish_reason == "length" for c in completions],
        )

    def _push_weights(self, model: nn.Module) -> None:
        self.llm.load_weights((name, param.detach()) for name, param in model.named_parameters())

    def sleep(self) -> None:
        if self.enable_sleep:
            self.llm.sleep()

    def wake_up(self) -> None:
        if self.enable_sleep:
            self.llm.wake_up()

    def close(self) -> None:
        self.llm.shutdown()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()


class ServerRollout(Rollout):
    """`vllm_mode="server"`: a `flywheel serve` process generates for every training process.

    The main process gathers every process's prompts, asks the server once (n = the repeat count
    when all prompts repeat alike), and scatters the completions back; it alone pushes weights,
    over the collective group the client opens with the server. The group is closed when training
    ends, so that another trainer may use the server, and opened again by the next push.
    """

    def __init__(self, args: RolloutTrainingArguments, settings: SamplingSettings, accelerator: Accelerator) -> None:
        super().__init__()
        self.settings = settings
        self.accelerator = accelerator
        self.client = None
        if accelerator.is_main_process:
            from flywheel import GenerationClient

            # A rollout takes as long as the server lets it (its --request_timeout).
            self.client = GenerationClient(
                base_url=args.vllm_server_base_url, host=args.vllm_server_host, server_port=args.vllm_server_port,
                group_port=args.vllm_group_port, connection_timeout=args.vllm_server_timeout, request_timeout=None,
            )
            device = accelerator.device
            self.device = "cpu" if device.type == "cpu" else device.index or 0
            self.client.init_communicator(device=self.device)
            # A group left open would refuse the next trainer that connects to this server.
            atexit.register(self.client.close_communicator)

    def generate(self, prompt_ids: list[list[int]]) -> RolloutOutput:
        per_process = gather_object([prompt_ids])
        payload: list[Any] = [None]
        if self.accelerator.is_main_process:
            payload = [self._generate_all([ids for share in per_process for ids in share])]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(payload, from_process=0)
        completion_ids, logprobs, truncated = payload[0]
        start = sum(len(share) for share in per_process[: self.accelerator.process_index])
        rows = slice(start, start + len(prompt_ids))
        return RolloutOutput(completion_ids[rows], logprobs[rows], truncated[rows])

    def _generate_all(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[list[float]], list[bool]]:
        # A run longer than a request's limit on n goes in pieces.
        runs = [(ids, min(DEFAULT_MAX_N, count - start))
                for ids, count in prompt_runs(prompt_ids) for start in range(0, count, DEFAULT_MAX_N)]
        counts = {count for _, count in runs}
        if len(counts) == 1:
            prompts, n = [ids for ids, _ in runs], counts.pop()
        else:
            prompts, n = prompt_ids, 1
        s = self.settings
        result = self.client.generate(
            prompts, n=n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
            repetition_penalty=s.repetition_penalty, max_tokens=s.max_tokens, logprobs=0,
            generation_kwargs=s.generation_kwargs or None,
        )
        logprobs = [[token[0] for token in completion] for completion in result["logprobs"]]
        truncated = [reason == "length" for reason in result["finish_reasons"]]
        return result["completion_ids"], logprobs, truncated

    def _push_weights(self, model: nn.Module) -> None:
        if self.client is not None:
            if self.client.group is None:
                self.client.init_communicator(device=self.device)
            self.client.update_model_params(model)
            self.client.reset_prefix_cache()

    def finish_training(self) -> None:
        self.close()

    def close(self) -> None:
        if self.client is not None:
            self.client.close_communicator()


def _max_model_len(args: RolloutTrainingArguments) -> int | None:
    """A colocated engine's context window: vllm_max_model_length, else the longest prompt and completion;
    None (the model config's) when prompts have no limit."""
    if args.vllm_max_model_length is not None or args.max_prompt_length is None:
        return args.vllm_max_model_length
    return args.max_prompt_length + args.max_completion_length


def _checkpoint_path(model: nn.Module,
                     processing_class: PreTrainedTokenizerBase) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """A directory the engine can load the model's architecture from (its own, or a saved copy).

    The engine's weights are overwritten by the first `sync_weights`, so only the architecture and
    the tokenizer of this directory matter.
    """
    path = getattr(getattr(model, "config", None), "_name_or_path", "")
    if path and os.path.isdir(path):
        return path, None
    tmpdir = tempfile.TemporaryDirectory(prefix="flywheel-colocate-")
    model.save_pretrained(tmpdir.name, safe_serialization=True)
    processing_class.save_pretrained(tmpdir.name)
    logger.info("model has no local checkpoint directory; saved a copy for the engine in %s", tmpdir.name)
    return tmpdir.name, tmpdir


def make_rollout(args: RolloutTrainingArguments, model: nn.Module, processing_class: PreTrainedTokenizerBase,
                 accelerator: Accelerator, eos_token_ids: list[int], model_path: str | None) -> Rollout:
    """The placement `args` asks for: transformers generate, a colocated engine, or a server.

    `model` is the unwrapped trained model; `model_path` the checkpoint it was loaded from (None when it
    was given as an object), which a colocated engine loads. Every placement that holds its own copy of
    the weights gets the trained model's before the first rollout: a server may serve another checkpoint.
    """
    settings = SamplingSettings.from_args(args)
    if not args.use_vllm:
        return TransformersRollout(model, settings, processing_class.pad_token_id, eos_token_ids, accelerator.device)
    if args.vllm_mode == "colocate":
        return ColocateRollout(model, model_path, processing_class, args, settings, accelerator)
    return ServerRollout(args, settings, accelerator)
