"""OnlineDPOTrainer: two fresh completions per prompt, ranked by a judge or rewards, then a DPO step."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from flywheel.trainer.judges import PairwiseJudge, RewardFunctionJudge, judge_text
from flywheel.trainer.logprobs import completion_logps
from flywheel.trainer.losses import dpo_loss
from flywheel.trainer.online_dpo_config import OnlineDPOConfig
from flywheel.trainer.online_trainer import Generated, OnlineTrainer, load_policy, reference_model
from flywheel.trainer.rewards import RewardFunc, RewardModelScorer


def fit_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_width: int,
                max_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The left-padded prompts [B, P] cut to their last columns, so that with completions `completion_width`
    wide the sequence is at most `max_length` long (each prompt keeps its last tokens); None: as they are."""
    if max_length is None:
        return prompt_ids, prompt_mask
    dropped = max(prompt_ids.size(1) + completion_width - max_length, 0)
    return prompt_ids[:, dropped:], prompt_mask[:, dropped:]


class OnlineDPOTrainer(OnlineTrainer):
    """Online DPO: per prompt, sample two completions from the current policy, rank them, and take a DPO
    step against a frozen reference model.

    Give exactly one ranker: `judge` (a `PairwiseJudge`), `reward_funcs` (functions and/or reward-model
    paths, weighted by `reward_weights`), or `reward_model` (one reward model, path or object).

    Example:
        trainer = OnlineDPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=my_reward,
                                   args=OnlineDPOConfig(output_dir="out", use_vllm=True), train_dataset=dataset)
        trainer.train()
    """

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: str | PreTrainedModel | None = None,
        reward_funcs: RewardFunc | str | PreTrainedModel | list[RewardFunc | str | PreTrainedModel] | None = None,
        reward_model: str | PreTrainedModel | None = None,
        judge: PairwiseJudge | None = None,
        args: OnlineDPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        reward_processing_classes: PreTrainedTokenizerBase | list[PreTrainedTokenizerBase | None] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
    ) -> None:
        rankers = [r for r in (reward_funcs, reward_model, judge) if r is not None]
        if len(rankers) != 1:
            raise ValueError("give exactly one of judge, reward_funcs or reward_model to rank the completions")
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = OnlineDPOConfig(output_dir=f"{name.rstrip('/').split('/')[-1]}-OnlineDPO")
        if not isinstance(args, OnlineDPOConfig):
            raise TypeError(f"args must be an OnlineDPOConfig, got {type(args).__name__}")
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers)
        if judge is None:
            judge = RewardFunctionJudge(reward_funcs if reward_funcs is not None else [reward_model],
                                        args.reward_weights, reward_processing_classes, args.trust_remote_code)
            for func in judge.reward_funcs:
                if isinstance(func, RewardModelScorer):
                    func.model = self.prepare_frozen_model(func.model)
        self.judge = judge
        if isinstance(ref_model, str):
            ref_model = load_policy(ref_model, args.model_init_kwargs, args.trust_remote_code)
        if ref_model is None:
            ref_model = reference_model(self.model_path, self.model, args.model_init_kwargs)
        self.prepare_forward(ref_model)
        self.ref_model = self.prepare_frozen_model(ref_model.eval().requires_grad_(False))

    def _prepare_inputs(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        mode = self.mode()
        prompts = [row["prompt"] for row in rows for _ in range(2)]
        generated = self.generate(prompts, mode)
        with self.metrics.timed(mode, "reward"):
            first_is_better, scores = self._rank(rows, generated, mode)
        pair = torch.arange(len(rows), device=self.accelerator.device) * 2
        chosen = pair + (~first_is_better).long()
        rejected = pair + first_is_better.long()
        order = torch.cat([chosen, rejected])  # rows: all chosen completions, then all rejected ones
        prompt_ids, prompt_mask = fit_prompts(generated.prompt_ids, generated.prompt_mask,
                                              generated.completion_ids_padded.size(1), self.args.max_length)
        batch = {
            "prompt_ids": prompt_ids[order],
            "prompt_mask": prompt_mask[order],
            "completion_ids": generated.completion_ids_padded[order],
            "completion_mask": generated.completion_mask[order],
            "contains_eos": (~generated.truncated)[order],
        }
        if scores is not None:
            batch["scores"] = scores[order]
        with torch.no_grad():
            ref_logps, _ = completion_logps(self.ref_model, batch["prompt_ids"], batch["prompt_mask"],
                                            batch["completion_ids"], batch["completion_mask"],
                                            temperature=self.args.temperature)
        batch["ref_logps"] = ref_logps
        return batch

    def _rank(self, rows: list[dict[str, Any]], generated: Generated,
              mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Whether the first completion of each pair wins, and each completion's score (None with a plain judge)."""
        device = self.accelerator.device
        if isinstance(self.judge, RewardFunctionJudge):
            columns = {key: [row[key] for row in rows for _ in range(2)] for key in rows[0] if key != "prompt"}
            scores, _ = self.judge.scores(generated.prompts, generated.completions, generated.completion_ids, columns,
                                          trainer_state=self.state)
            scores = scores.to(device)
            if self.args.missing_eos_penalty is not None:
                scores = scores - self.args.missing_eos_penalty * generated.truncated.float()
            pairs = scores.view(-1, 2)
            return pairs[:, 0] >= pairs[:, 1], scores
        completions = [judge_text(completion) for completion in generated.completions]
        pairs = [completions[i : i + 2] for i in range(0, len(completions), 2)]
        verdicts = self.judge.judge([judge_text(prompt) for prompt in generated.prompts[::2]], pairs)
        # The first completion is chosen only when the judge prefers it (an undecided -1 chooses the second, as TRL)
        return torch.tensor([verdict == 0 for verdict in verdicts], device=device), None

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> torch.Tensor:
        if return_outputs:
            raise ValueError("OnlineDPOTrainer.compute_loss does not return model outputs")
        mode = "train" if model.training else "eval"
        mask = inputs["completion_mask"]
        token_logps, _ = completion_logps(model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
                                          mask, temperature=self.args.temperature)
        logps = (token_logps * mask).sum(-1)
        ref_logps = (inputs["ref_logps"] * mask).sum(-1)
        num_pairs = logps.size(0) // 2
        beta = self.args.beta_at(self.state.epoch or 0.0)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            logps[:num_pairs], logps[num_pairs:], ref_logps[:num_pairs], ref_logps[num_pairs:],
            beta=beta, loss_type=self.args.loss_type,
        )
        self._log_step(mode, inputs, logps.detach(), ref_logps, chosen_rewards, rejected_rewards, beta)
        return losses.mean()

    def _log_step(self, mode: str, inputs: dict[str, Any], logps: torch.Tensor, ref_logps: torch.Tensor,
                  chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, beta: float) -> None:
        num_pairs = logps.size(0) // 2
        kl = logps - ref_logps  # per completion: the sampled estimate of KL(π ‖ π_ref)
        self.log_mean(mode, "objective/kl", kl.mean())
        self.log_mean(mode, "objective/entropy", -logps.mean())
        self.log_mean(mode, "objective/non_score_reward", -beta * kl.mean())
        self.log_mean(mode, "rewards/chosen", chosen_rewards.mean())
        self.log_mean(mode, "rewards/rejected", rejected_rewards.mean())
        self.log_mean(mode, "rewards/margins", (chosen_rewards - rejected_rewards).mean())
        self.log_mean(mode, "rewards/accuracies", (chosen_rewards > rejected_rewards).float().mean())
        self.log_mean(mode, "logps/chosen", logps[:num_pairs].mean())
        self.log_mean(mode, "logps/rejected", logps[num_pairs:].mean())
        self.log_mean(mode, "val/contain_eos_token", inputs["contains_eos"].float().mean())
        self.metrics.add(mode, "beta", beta)
        if "scores" in inputs:
            scores = inputs["scores"]
            self.log_mean(mode, "objective/scores", scores.mean())
            self.log_mean(mode, "objective/scores_margin", (scores[:num_pairs] - scores[num_pairs:]).mean())
            self.log_mean(mode, "objective/rlhf_reward", scores.mean() - beta * kl.mean())
