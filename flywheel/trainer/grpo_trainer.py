"""GRPOTrainer: Group Relative Policy Optimization on `transformers.Trainer`, rollouts from any placement."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from flywheel.trainer.batching import split_batch
from flywheel.trainer.completion_sample import CompletionSample
from flywheel.trainer.grpo_config import GRPOConfig
from flywheel.trainer.logprobs import completion_logps
from flywheel.trainer.losses import grpo_loss, importance_sampling_weights, masked_extremes, masked_mean
from flywheel.trainer.online_trainer import Generated, OnlineTrainer, reference_model
from flywheel.trainer.ref_sync import SyncRefModelCallback
from flywheel.trainer.rewards import (
    RewardFunc,
    RewardModelScorer,
    combine_rewards,
    compute_rewards,
    decoupled_group_advantages,
    group_advantages,
    group_std,
    load_reward_funcs,
    reward_func_name,
)
from flywheel.trainer.sampler import RepeatSampler


class GRPOTrainer(OnlineTrainer):
    """Trains a causal LM with GRPO: sample `num_generations` completions per prompt, score them with the
    reward functions, and push up the completions that beat their group's mean.

    Example:
        trainer = GRPOTrainer(model="Qwen/Qwen2.5-0.5B", reward_funcs=my_reward, train_dataset=dataset,
                              args=GRPOConfig(output_dir="out", use_vllm=True, vllm_mode="colocate"))
        trainer.train()

    Only what changes from `Trainer` is overridden: the sampler (groups of one prompt), input
    preparation (generation, rewards, advantages, buffered over `steps_per_generation` micro-steps),
    the loss, and logging.
    """

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_funcs: RewardFunc | str | PreTrainedModel | list[RewardFunc | str | PreTrainedModel],
        args: GRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        reward_processing_classes: PreTrainedTokenizerBase | list[PreTrainedTokenizerBase | None] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = GRPOConfig(output_dir=f"{name.rstrip('/').split('/')[-1]}-GRPO")
        if not isinstance(args, GRPOConfig):
            raise TypeError(f"args must be a GRPOConfig, got {type(args).__name__}")
        self._completion_sample: CompletionSample | None = None  # the next log prints it (log_completions)
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers)
        self.reward_funcs = load_reward_funcs(reward_funcs, reward_processing_classes, args.trust_remote_code)
        for func in self.reward_funcs:
            if isinstance(func, RewardModelScorer):
                func.model = self.prepare_frozen_model(func.model)
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(weights)} values for {len(self.reward_funcs)} reward functions"
            )
        self.reward_weights = torch.tensor(weights, dtype=torch.float32, device=self.accelerator.device)
        self.ref_model = None
        if args.beta != 0.0:
            ref = reference_model(self.model_path, self.model, args.model_init_kwargs)
            self.prepare_forward(ref)
            self.ref_model = self.prepare_frozen_model(ref)
            if args.sync_ref_model:
                self.add_callback(SyncRefModelCallback(self.accelerator.unwrap_model(self.ref_model), self.model,
                                                       args.ref_model_mixup_alpha, args.ref_model_sync_steps))
        # A generation is trained on over `steps_per_generation × num_iterations` micro-steps. Unless
        # every optimizer step spans whole generations, some of those micro-steps run after an
        # optimizer step, and the generating policy's logprobs need a pass of their own; otherwise
        # they are the training forward's, detached.
        generate_every = args.steps_per_generation * args.num_iterations
        self.needs_old_logps = args.gradient_accumulation_steps % generate_every != 0
        self._buffered: list[dict[str, Any]] | None = None
        self._micro_step = 0

    # ---- data ----

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("GRPOTrainer: training requires a train_dataset")
        # One loader batch per process is its share of a whole generation batch.
        return self._get_dataloader(self.train_dataset, "Training",
                                    batch_size=self._train_batch_size * self.args.steps_per_generation,
                                    sampler_fn=self._get_train_sampler, is_training=True)

    def _get_train_sampler(self, train_dataset: Any = None) -> Sampler:
        dataset = self.train_dataset if train_dataset is None else train_dataset
        args = self.args
        return RepeatSampler(dataset, mini_repeat_count=args.num_generations,
                             batch_size=args.generation_batch_size // args.num_generations,
                             repeat_count=args.num_iterations * args.steps_per_generation,
                             shuffle=args.shuffle_dataset, seed=args.seed)

    def _get_eval_sampler(self, eval_dataset: Any) -> Sampler:
        return RepeatSampler(eval_dataset, mini_repeat_count=self.args.num_generations_eval, shuffle=False,
                             seed=self.args.seed)

    # ---- rollouts ----

    def _prepare_inputs(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.model.training:
            return self._generate_and_score(rows, "eval")
        generate_every = self.args.steps_per_generation * self.args.num_iterations
        if self._buffered is None or self._micro_step % generate_every == 0:
            batch = self._generate_and_score(rows, "train")
            self._buffered = split_batch(batch, self.args.steps_per_generation)
        inputs = self._buffered[self._micro_step % self.args.steps_per_generation]
        self._micro_step += 1
        return inputs

    def _generate_and_score(self, rows: list[dict[str, Any]], mode: str) -> dict[str, Any]:
        args = self.args
        prompts = [row["prompt"] for row in rows]
        generated = self.generate(prompts, mode)

        # Computed once, when the loss first asks: after it has launched its micro-batch's forward pass,
        # so that calling the reward functions (on completions decoded meanwhile) overlaps that pass on the GPU.
        @functools.cache
        def advantages() -> torch.Tensor:
            with self.metrics.timed(mode, "reward"):
                return self._advantages(rows, generated, mode)

        loss_mask = generated.completion_mask
        if args.mask_truncated_completions:
            loss_mask = loss_mask * (~generated.truncated).unsqueeze(1)
        total_tokens = self.accelerator.gather(loss_mask.sum()).sum().float().clamp(min=1)
        micro_batches = args.steps_per_generation if mode == "train" else 1
        batch: dict[str, Any] = {
            "prompt_ids": generated.prompt_ids,
            "prompt_mask": generated.prompt_mask,
            "completion_ids": generated.completion_ids_padded,
            "completion_mask": generated.completion_mask,
            "loss_mask": loss_mask,
            "advantages": advantages,
            # Each row's place in the batch, to read its advantage (split into micro-batches like the tensors).
            "rows": torch.arange(len(rows), device=loss_mask.device),
            # dapo's normaliser: the tokens of an average micro-batch of one process.
            "tokens_per_micro_batch": total_tokens / (self.accelerator.num_processes * micro_batches),
        }
        if generated.sampling_logps is not None:
            batch["sampling_logps"] = generated.sampling_logps
        with torch.no_grad():
            if self.needs_old_logps and mode == "train":
                batch["old_logps"] = self._logps(self.model, batch)
                if self._corrects_sampling(mode, batch):
                    batch["importance_weights"] = self._importance_weights(
                        mode, batch["old_logps"], batch["sampling_logps"], generated.completion_mask
                    )
            if self.ref_model is not None:
                batch["ref_logps"] = self._logps(self.ref_model, batch)
        return batch

    def _logps(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        logps, _ = completion_logps(model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"],
                                    batch["completion_mask"], temperature=self.args.temperature,
                                    batch_size=self.args.per_device_train_batch_size)
        return logps

    def _advantages(self, rows: list[dict[str, Any]], generated: Generated, mode: str) -> torch.Tensor:
        columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
        local = compute_rewards(self.reward_funcs, generated.prompts, generated.completions, generated.completion_ids,
                                columns, trainer_state=self.state)
        rewards_per_func = self.accelerator.gather(local.to(self.accelerator.device))
        rewards = combine_rewards(rewards_per_func, self.reward_weights)
        num_generations = self.args.num_generations if mode == "train" else self.args.num_generations_eval
        if self.args.multi_objective_aggregation == "normalize_then_sum":
            advantages = decoupled_group_advantages(rewards_per_func, self.reward_weights, num_generations)
            reward_std = group_std(rewards, num_generations)
        else:
            advantages, reward_std = group_advantages(rewards, num_generations, self.args.scale_rewards)

        # Recorded as tensors: reading them here would wait for the forward pass queued before scoring.
        self.metrics.add(mode, "reward", rewards.mean())
        self.metrics.add(mode, "reward_std", reward_std.mean())
        self.metrics.add(mode, "frac_reward_zero_std", (reward_std < 1e-6).float().mean())
        for column, func in enumerate(self.reward_funcs):
            values = rewards_per_func[:, column]
            name = reward_func_name(func)
            self.metrics.add(mode, f"rewards/{name}/mean", values.nanmean())
            self.metrics.add(mode, f"rewards/{name}/std", _nan_std(values))
        if self.args.log_completions:
            self._remember_completions(generated, rewards_per_func, advantages)

        start = self.accelerator.process_index * len(rows)
        return advantages[start : start + len(rows)]

    def _corrects_sampling(self, mode: str, batch: dict[str, Any]) -> bool:
        """Whether the training loss of `batch` is weighted by the trainer-over-engine probability ratio."""
        correction = self.args.use_vllm and self.args.vllm_importance_sampling_correction
        return correction and mode == "train" and "sampling_logps" in batch

    def _importance_weights(self, mode: str, old_logps: torch.Tensor, sampling_logps: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
        """Importance-sampling weights π_old / π_engine (`vllm_importance_sampling_mode`), logged over the real
        tokens."""
        weights = importance_sampling_weights(old_logps, sampling_logps, mask,
                                              mode=self.args.vllm_importance_sampling_mode,
                                              clip_min=self.args.vllm_importance_sampling_clip_min,
                                              clip_max=self.args.vllm_importance_sampling_clip_max)
        low, high = masked_extremes(weights, mask)
        mean = torch.where(mask.any(), masked_mean(weights, mask), float("nan"))
        self.log_mean(mode, "sampling/importance_sampling_ratio/mean", mean)
        self.log_mean(mode, "sampling/importance_sampling_ratio/min", low)
        self.log_mean(mode, "sampling/importance_sampling_ratio/max", high)
        return weights

    def _high_entropy_mask(self, entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """True on the real tokens whose entropy is in the top `top_entropy_quantile` of this micro-step's
        real tokens over all processes."""
        real = mask.bool()
        values = self.accelerator.pad_across_processes(entropy[real].float(), pad_index=float("nan"))
        values = self.accelerator.gather(values)
        if values.isnan().all():
            return real
        threshold = torch.nanquantile(values, 1.0 - self.args.top_entropy_quantile)
        return real & (entropy >= threshold)

    def _remember_completions(self, generated: Generated, rewards_per_func: torch.Tensor,
                              advantages: torch.Tensor) -> None:
        """Keep the generation's sample (all processes' rows) for the next log."""
        from accelerate.utils import gather_object

        prompts = gather_object(generated.prompts)
        completions = gather_object(generated.completions)
        if self.accelerator.is_main_process:
            per_func = rewards_per_func.t().tolist()
            self._completion_sample = CompletionSample(
                self.state.global_step, prompts, completions,
                {reward_func_name(func): per_func[column] for column, func in enumerate(self.reward_funcs)},
                advantages.tolist())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)
        if self._completion_sample is not None and self.model.training:
            print(self._completion_sample.render(self.args.num_completions_to_print), flush=True)
            self._completion_sample = None

    # ---- loss ----

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        if return_outputs:
            raise ValueError("GRPOTrainer.compute_loss does not return model outputs")
        args = self.args
        mode = "train" if model.training else "eval"
        logps, entropy = completion_logps(model, inputs["prompt_ids"], inputs["prompt_mask"],
                                          inputs["completion_ids"], inputs["completion_mask"],
                                          temperature=args.temperature, with_entropy=True)
        advantages = inputs["advantages"]()[inputs["rows"]]  # scored while the GPU runs the forward pass
        mask = inputs["completion_mask"]
        old_logps = inputs.get("old_logps", logps.detach())
        importance_weights = inputs.get("importance_weights")
        if "old_logps" not in inputs and self._corrects_sampling(mode, inputs):
            importance_weights = self._importance_weights(mode, old_logps, inputs["sampling_logps"], mask)
        entropy_mask = None
        if args.top_entropy_quantile < 1.0:
            entropy_mask = self._high_entropy_mask(entropy.detach(), inputs["loss_mask"])
        loss, stats = grpo_loss(
            logps, old_logps, advantages, inputs["loss_mask"], loss_type=args.loss_type,
            epsilon_low=args.epsilon, epsilon_high=args.epsilon_high,
            importance_sampling_level=args.importance_sampling_level, delta=args.delta, beta=args.beta,
            ref_logps=inputs.get("ref_logps"), kl_bias_correction=args.use_bias_correction_kl,
            importance_weights=importance_weights, entropy_mask=entropy_mask,
            off_policy_mask_threshold=args.off_policy_mask_threshold, sampling_logps=inputs.get("sampling_logps"),
            max_completion_length=args.max_completion_length, num_items_in_batch=inputs["tokens_per_micro_batch"],
        )
        self.log_mean(mode, "entropy", masked_mean(entropy.detach(), mask))
        for name, value in stats.items():
            self.log_mean(mode, name if name == "kl" else f"{name}_mean", value)
        if "sampling_logps" in inputs:
            # The generating policy's trainer logprobs vs the engine's: the gap logged to watch drift.
            gap = (old_logps - inputs["sampling_logps"]).abs()
            self.log_mean(mode, "sampling/sampling_logp_difference/mean", masked_mean(gap, mask))
            self.log_mean(mode, "sampling/sampling_logp_difference/max", masked_extremes(gap, mask)[1])
        return loss


def _nan_std(values: torch.Tensor) -> torch.Tensor:
    """The sample standard deviation of the values that are not NaN; NaN with fewer than two (no host sync)."""
    real = ~torch.isnan(values)
    count = real.sum()
    mean = torch.where(real, values, 0.0).sum() / count.clamp(min=1)
    squares = torch.where(real, (values - mean) ** 2, 0.0).sum()
    return torch.where(count > 1, squares / (count - 1).clamp(min=1), float("nan")).sqrt()
