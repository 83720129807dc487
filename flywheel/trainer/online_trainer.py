"""OnlineTrainer: what GRPO and Online DPO share on top of `transformers.Trainer`.

Loading the policy and tokenizer, the rollout placement, weight sync before generation, decoding,
completion-length and phase-time metrics, and logging them with the Trainer's own logs.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MethodType
from typing import Any

import torch
from accelerate.utils import set_seed
from accelerate.utils.operations import ConvertOutputsToFp32
from torch import nn
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
)
from transformers.trainer_utils import EvalLoopOutput

from flywheel.trainer.batching import left_pad, right_pad
from flywheel.trainer.exit_teardown import destroy_gloo_group_at_exit
from flywheel.trainer.gc_freeze import FreezeAfterFirstStep
from flywheel.trainer.logprobs import float32_lm_head
from flywheel.trainer.metrics import MetricsLog
from flywheel.trainer.prompt_packing import enable_packed_prompts
from flywheel.trainer.prompts import decode_completions, reward_prompt, tokenize_prompts
from flywheel.trainer.rollout import make_rollout
from flywheel.trainer.rollout_config import RolloutTrainingArguments


@dataclass
class Generated:
    """This process's completions of one rollout, as lists and as padded tensors."""

    prompts: list[Any]  # as reward functions get them (`reward_prompt`)
    completion_ids: list[list[int]]
    truncated: torch.Tensor  # [B] bool
    sampling_logps: torch.Tensor | None  # [B, C] the generator's logprobs, 0 on padding
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor
    completion_ids_padded: torch.Tensor  # [B, C] right-padded
    completion_mask: torch.Tensor
    decoding: Future = field(repr=False)  # of the completion texts

    @property
    def completions(self) -> list[Any]:
        """The completion texts (messages for conversational prompts), decoded beside the main thread."""
        return self.decoding.result()


def identity_collator(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows stay rows: prompts are tokenized at generation time."""
    return rows


def from_pretrained_kwargs(model_init_kwargs: dict[str, Any] | None,
                           trust_remote_code: bool = False) -> dict[str, Any]:
    """The keyword arguments that load a model from a path: `model_init_kwargs`, with dtype 'auto' and
    `trust_remote_code` where it does not set them."""
    return {"dtype": "auto", "trust_remote_code": trust_remote_code, **(model_init_kwargs or {})}


def load_policy(model: str | PreTrainedModel, model_init_kwargs: dict[str, Any] | None,
                trust_remote_code: bool = False) -> PreTrainedModel:
    """The trained model: loaded from a path (with `from_pretrained_kwargs`), or used as given."""
    if isinstance(model, str):
        return AutoModelForCausalLM.from_pretrained(model, **from_pretrained_kwargs(model_init_kwargs,
                                                                                   trust_remote_code))
    if model_init_kwargs:
        raise ValueError("model_init_kwargs applies only when model is a path; the model was given as an object")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a path or a transformers PreTrainedModel, got {type(model)}")
    return model


def keep_outputs_in_model_dtype(model: nn.Module) -> None:
    """Undo accelerate's float32 copy of a mixed-precision model's outputs, keeping its autocast.

    For the [tokens, vocab] logits that copy is gigabytes per micro-batch each way (and twice the
    memory); the logprob passes read the logits in their own dtype and compute in float32 anyway.
    """
    module = getattr(model, "_orig_mod", model)  # a compiled model's own module
    forward = module.__dict__.get("forward")
    func = getattr(forward, "__func__", forward)
    converter = getattr(func, "__wrapped__", func)
    if isinstance(converter, ConvertOutputsToFp32):
        inner = converter.model_forward
        module.forward = MethodType(inner, module) if isinstance(forward, MethodType) else inner


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout of `model` to 0: its `nn.Dropout` modules and its attention layers' own rate."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0


def reference_model(model_path: str | None, policy: PreTrainedModel,
                    model_init_kwargs: dict[str, Any] | None) -> PreTrainedModel:
    """A frozen copy of the initial policy (reloaded from its path, or deep-copied)."""
    if model_path is None:
        ref = copy.deepcopy(policy)
    else:
        # By the policy's own class: the same architecture, and the code a checkpoint may ship was trusted
        # (trust_remote_code) when the policy was loaded.
        ref = type(policy).from_pretrained(model_path, **from_pretrained_kwargs(model_init_kwargs))
    return ref.eval().requires_grad_(False)


def load_tokenizer(model: PreTrainedModel, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model.config._name_or_path, trust_remote_code=trust_remote_code)


class OnlineTrainer(Trainer):
    """Base of the online trainers: generation with any placement, plus shared metrics."""

    def __init__(
        self,
        model: str | PreTrainedModel,
        args: RolloutTrainingArguments,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
    ) -> None:
        self.model_path = model if isinstance(model, str) else None
        model = load_policy(model, args.model_init_kwargs, args.trust_remote_code)
        if processing_class is None:
            processing_class = load_tokenizer(model, args.trust_remote_code)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        super().__init__(model=model, args=args, data_collator=identity_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers)
        # The Trainer seeds every process alike; a group split over processes would then be sampled
        # alike by each (transformers' generate draws from the global generator).
        set_seed(args.seed, device_specific=True)
        # The losses are per-micro-batch means: the Trainer divides them by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.prepare_forward(self.model)
        self.metrics = MetricsLog()
        # Completions are decoded here while the main thread pads the batch and launches the first forward
        # pass: the Rust tokenizer releases the GIL.
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flywheel-decode")
        self._metrics_logged_step = 0
        self.eos_token_ids = self._eos_token_ids()
        destroy_gloo_group_at_exit(self)  # registered before the rollout's own exit hooks, so it runs after them
        self.add_callback(FreezeAfterFirstStep())
        self.rollout = make_rollout(args, self.model, processing_class, self.accelerator, self.eos_token_ids,
                                    self.model_path)

    def _eos_token_ids(self) -> list[int]:
        ids = {self.processing_class.eos_token_id}
        config_eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
        return sorted(i for i in ids if i is not None)

    def prepare_frozen_model(self, model: nn.Module) -> nn.Module:
        """Put a no-grad helper model (reference, reward) on the device with the training precision."""
        model = self.accelerator.prepare_model(model, evaluation_mode=True)
        keep_outputs_in_model_dtype(self.accelerator.unwrap_model(model))
        return model

    def prepare_forward(self, model: PreTrainedModel) -> None:
        """Dropout off if asked (`disable_dropout`); the head in float32 if asked (`cast_lm_head_to_fp32`); a
        batch's groups scored in packed forwards if asked (`pack_prompts`)."""
        if self.args.disable_dropout:
            disable_dropout(model)
        if self.args.cast_lm_head_to_fp32:
            float32_lm_head(model)
        if self.args.pack_prompts:
            enable_packed_prompts(model)

    def mode(self) -> str:
        return "train" if self.model.training else "eval"

    def generate(self, prompts: list[Any], mode: str) -> Generated:
        """Sync weights if they changed, then one completion per prompt entry, from this process's share."""
        device = self.accelerator.device
        prompts = list(prompts)
        prompt_ids = tokenize_prompts(prompts, self.processing_class, self.args.max_prompt_length,
                                      self.args.chat_template_kwargs)
        pad = self.processing_class.pad_token_id
        prompt_tensor, prompt_mask = left_pad(prompt_ids, pad, device)
        with self.metrics.timed(mode, "weight_sync"):
            self.rollout.sync_weights(self.accelerator.unwrap_model(self.model), self.state.global_step)
        with self.metrics.timed(mode, "generation"):
            self.rollout.wake_up()
            output = self.rollout.generate(prompt_ids)
            self.rollout.sleep()
        completion_tensor, completion_mask = right_pad(output.completion_ids, pad, device)
        sampling_logps = None
        if output.logprobs is not None:
            # In float64, the engine's own type: its rows are copied as bytes rather than converted.
            sampling_logps = right_pad(output.logprobs, 0, device, dtype=torch.float64)[0].float()
        # Decoded while the GPU trains: submitted after the padding, whose Python it would otherwise
        # slow down (the decoding holds the interpreter while it converts the rows).
        decoding = self._decoder.submit(decode_completions, prompts, output.completion_ids, self.processing_class)
        generated = Generated(
            prompts=[reward_prompt(prompt) for prompt in prompts],
            completion_ids=output.completion_ids,
            truncated=torch.tensor(output.truncated, dtype=torch.bool, device=device),
            sampling_logps=sampling_logps,
            prompt_ids=prompt_tensor,
            prompt_mask=prompt_mask,
            completion_ids_padded=completion_tensor,
            completion_mask=completion_mask,
            decoding=decoding,
        )
        self._log_lengths(mode, generated)
        return generated

    def _log_lengths(self, mode: str, generated: Generated) -> None:
        lengths = self.accelerator.gather(generated.completion_mask.sum(-1))
        truncated = self.accelerator.gather(generated.truncated.long()).bool()
        self.metrics.add(mode, "completions/mean_length", lengths.float().mean().item())
        self.metrics.add(mode, "completions/min_length", lengths.min().item())
        self.metrics.add(mode, "completions/max_length", lengths.max().item())
        self.metrics.add(mode, "completions/clipped_ratio", truncated.float().mean().item())
        terminated = lengths[~truncated]
        self.metrics.add(mode, "completions/mean_terminated_length",
                         terminated.float().mean().item() if terminated.numel() else float("nan"))
        prompt_tokens = self.accelerator.gather(generated.prompt_mask.sum()).sum()
        if mode == "train":
            self.state.num_input_tokens_seen += (lengths.sum() + prompt_tokens).item()
        # As in TRL: the tokens (prompts and completions) trained on so far, over all processes.
        self.metrics.set(mode, "num_tokens", self.state.num_input_tokens_seen)

    def log_mean(self, mode: str, name: str, value: torch.Tensor) -> None:
        """Log the mean over processes of a per-process scalar (NaN where a process had none)."""
        values = self.accelerator.gather(value.detach().float().reshape(1))
        self.metrics.add(mode, name, values.nanmean())

    def training_step(self, model: nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        # Time spent training = the step minus the generation/reward/sync time recorded inside it.
        keep_outputs_in_model_dtype(self.accelerator.unwrap_model(model))  # prepared by now
        recorded_before = self.metrics.seconds("train")
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        inner = self.metrics.seconds("train") - recorded_before
        self.metrics.add_time("train", "train", time.perf_counter() - start - inner)
        return loss

    def prediction_step(self, model: nn.Module, inputs: Any, prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        keep_outputs_in_model_dtype(self.accelerator.unwrap_model(model))
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def train(self, *args: Any, **kwargs: Any):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.rollout.finish_training()

    def evaluation_loop(self, dataloader: DataLoader, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> EvalLoopOutput:
        """As `Trainer.evaluation_loop`, with the generation metrics of the pass in its metrics: what
        `evaluate` logs and returns (so `metric_for_best_model` can name one) and what `predict` returns."""
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self.metrics.summary("eval", 1).items()})
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            steps = self.state.global_step - self._metrics_logged_step
            self._metrics_logged_step = self.state.global_step
            logs = {**logs, **self.metrics.summary("train", steps)}
        super().log(logs, start_time)
