"""GRPOConfig: the GRPO trainer's arguments, with TRL's names and help texts."""

from __future__ import annotations

from dataclasses import dataclass, field

from flywheel.trainer.losses import IMPORTANCE_SAMPLING_MODES
from flywheel.trainer.rollout_config import RolloutTrainingArguments

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
DEFAULT_CLIP_MAX = 2.0
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


@dataclass
class GRPOConfig(RolloutTrainingArguments):
    """Arguments of `GRPOTrainer`.

    Batch sizes count completions, not prompts: one optimizer step sees
    `per_device_train_batch_size × processes × gradient_accumulation_steps` completions, made of
    groups of `num_generations` completions of the same prompt.
    """

    num_generations: int = field(
        default=8,
        metadata={"help": "Completions sampled per prompt (the group whose mean reward is the baseline); >= 2."},
    )
    num_generations_eval: int | None = field(
        default=None,
        metadata={"help": "Completions sampled per prompt during evaluation (fewer saves time); >= 1, where a group "
                          "of one has advantage 0. Default: num_generations."},
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Completions generated at once over all processes; a multiple of per_device_train_batch_size × "
            "processes. Default: that product × steps_per_generation. Set this or steps_per_generation."
        },
    )
    steps_per_generation: int | None = field(
        default=None,
        metadata={"help": "Micro-batches trained on per generation. Default: gradient_accumulation_steps."},
    )
    beta: float = field(
        default=0.0,
        metadata={"help": "Weight of the KL penalty to the reference model; 0 loads no reference model."},
    )
    sync_ref_model: bool = field(
        default=False,
        metadata={
            "help": "Pull the reference model towards the policy every ref_model_sync_steps optimizer steps "
            "(TR-DPO): π_ref ← α·π_θ + (1 − α)·π_ref. Needs beta > 0."
        },
    )
    ref_model_mixup_alpha: float = field(
        default=0.6,
        metadata={"help": "α of the reference update above, in (0, 1]; 1 copies the policy."},
    )
    ref_model_sync_steps: int = field(
        default=512,
        metadata={"help": "Optimizer steps between two reference updates (τ in TR-DPO)."},
    )
    num_iterations: int = field(
        default=1,
        metadata={"help": "Updates per generation batch (μ in the GRPO paper); > 1 makes later updates off-policy."},
    )
    epsilon: float = field(
        default=0.2, metadata={"help": "Lower clipping bound of the probability ratio: 1 - epsilon."}
    )
    epsilon_high: float | None = field(
        default=None,
        metadata={"help": "Upper clipping bound: 1 + epsilon_high (DAPO's clip-higher). Default: epsilon."},
    )
    delta: float | None = field(
        default=None,
        metadata={
            "help": "Two-sided clipping (INTELLECT-2): cap the unclipped probability ratio at delta as well, so "
            "that a token with a negative advantage weighs at most delta; > 1, best above 1 + epsilon_high. "
            "Default: no cap."
        },
    )
    importance_sampling_level: str = field(
        default="token",
        metadata={
            "help": "'token': a probability ratio per token (GRPO). 'sequence': one ratio per completion, the "
            "exp of its tokens' mean log-ratio, clipped as a whole (GSPO; the paper pairs it with loss_type "
            "'grpo' and epsilon 3e-4, epsilon_high 4e-4). On-policy every ratio is 1, so the choice matters only "
            "when steps_per_generation > gradient_accumulation_steps or num_iterations > 1."
        },
    )
    top_entropy_quantile: float = field(
        default=1.0,
        metadata={
            "help": "ρ of 'Beyond the 80/20 rule': only the tokens whose entropy is in the top ρ quantile of the "
            "micro-batch (over all processes) keep their policy-gradient term; the KL term keeps every token. "
            "1.0 keeps all tokens, 0.0 only the highest-entropy one."
        },
    )
    loss_type: str = field(
        default="dapo",
        metadata={
            "help": "How per-token losses are averaged. 'grpo': per sequence, then over sequences (length-biased). "
            "'bnpo': over the micro-batch's tokens. 'dr_grpo': sum over tokens ÷ (sequences × "
            "max_completion_length). 'dapo': over all tokens of the optimizer step's batch, across processes."
        },
    )
    scale_rewards: str = field(
        default="group",
        metadata={
            "help": "Divide advantages by the reward std of the 'group' (GRPO), of the whole 'batch', or 'none' "
            "(Dr. GRPO). True and False mean 'group' and 'none'."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "One weight per reward function (the total reward is the weighted sum). Default: all 1."},
    )
    multi_objective_aggregation: str = field(
        default="sum_then_normalize",
        metadata={
            "help": "How several reward functions make one advantage. 'sum_then_normalize': their weighted sum, "
            "then normalised per scale_rewards. 'normalize_then_sum' (GDPO): each function's rewards normalised "
            "within their group (mean and std, a function's None skipped), then the weighted sum, normalised by "
            "the whole batch's mean and std; it takes scale_rewards 'group' only."
        },
    )
    mask_truncated_completions: bool = field(
        default=False,
        metadata={"help": "Leave completions that hit max_completion_length (no EOS) out of the loss."},
    )
    vllm_importance_sampling_correction: bool = field(
        default=True,
        metadata={
            "help": "With use_vllm, weight each token's loss by the ratio π_trainer / π_engine (bounded, see "
            "vllm_importance_sampling_mode) to correct the gap between the engine's and the trainer's "
            "probabilities."
        },
    )
    vllm_importance_sampling_mode: str = field(
        default="token_truncate",
        metadata={
            "help": "How that ratio is taken: per 'token_…' or per completion, 'sequence_…' (the product of its "
            "tokens' ratios, for all its tokens); outside [vllm_importance_sampling_clip_min, "
            "vllm_importance_sampling_clip_max] it is clamped to the bound ('…_truncate') or set to 0 ('…_mask'). "
            "One of token_truncate, token_mask, sequence_truncate, sequence_mask."
        },
    )
    vllm_importance_sampling_clip_max: float | None = field(
        default=DEFAULT_CLIP_MAX,
        metadata={"help": "Upper bound C_max of the importance-sampling ratio (see vllm_importance_sampling_mode), "
                          "> 0; None: no upper bound."},
    )
    vllm_importance_sampling_clip_min: float | None = field(
        default=None,
        metadata={"help": "Lower bound C_min of the importance-sampling ratio (see vllm_importance_sampling_mode), "
                          ">= 0 and below C_max; None: no lower bound. A '…_mask' mode with C_min and no C_max "
                          "masks only the ratios below C_min."},
    )
    vllm_importance_sampling_cap: float | None = field(
        default=None,
        metadata={"help": "The older name of vllm_importance_sampling_clip_max; after construction it holds "
                          "clip_max's value."},
    )
    off_policy_mask_threshold: float | None = field(
        default=None,
        metadata={
            "help": "Off-policy sequence masking (δ of DeepSeek-V3.2): a completion with a negative advantage "
            "whose mean per-token log π_sampling − log π_θ exceeds this (> 0, e.g. 0.5) is left out of the policy "
            "term; π_sampling is the engine's logprobs when the rollout returns them, else the generating "
            "policy's. None: no masking."
        },
    )
    use_bias_correction_kl: bool = field(
        default=True,
        metadata={
            "help": "Multiply the per-token KL penalty by the probability ratio π_θ / π_old (per token or sequence, "
            "as importance_sampling_level), which makes it an unbiased estimate of the KL of π_θ from completions "
            "of π_old (DeepSeek-V3.2). Only with beta > 0."
        },
    )
    shuffle_dataset: bool = field(default=True, metadata={"help": "Shuffle the training prompts."})
    log_completions: bool = field(
        default=False,
        metadata={"help": "Print the last generation's prompts, completions, rewards and advantages at every "
                          "logging step."},
    )
    num_completions_to_print: int | None = field(
        default=None,
        metadata={"help": "How many completions log_completions shows; None: all of the last generation."},
    )

    @property
    def completions_per_rollout(self) -> int:
        return self.per_device_train_batch_size * self.steps_per_generation

    def __post_init__(self) -> None:
        if isinstance(self.scale_rewards, bool):
            self.scale_rewards = "group" if self.scale_rewards else "none"
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS} (or a bool), got {self.scale_rewards!r}")
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2 (the group's mean reward is the baseline), got {self.num_generations}"
            )
        if self.num_generations_eval is None:
            self.num_generations_eval = self.num_generations
        if self.num_generations_eval < 1:
            raise ValueError(f"num_generations_eval must be >= 1, got {self.num_generations_eval}")
        if self.multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
            raise ValueError(f"multi_objective_aggregation must be one of {MULTI_OBJECTIVE_AGGREGATIONS}, "
                             f"got {self.multi_objective_aggregation!r}")
        if self.multi_objective_aggregation == "normalize_then_sum" and self.scale_rewards != "group":
            raise ValueError(
                "multi_objective_aggregation 'normalize_then_sum' normalises each reward by its group and the sum "
                f"by the batch; scale_rewards {self.scale_rewards!r} does not apply: leave it at 'group' or use "
                "'sum_then_normalize'"
            )
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.sync_ref_model and self.beta == 0:
            raise ValueError("sync_ref_model needs a reference model: set beta > 0")
        if not 0 < self.ref_model_mixup_alpha <= 1:
            raise ValueError(f"ref_model_mixup_alpha must be in (0, 1], got {self.ref_model_mixup_alpha}")
        if self.ref_model_sync_steps < 1:
            raise ValueError(f"ref_model_sync_steps must be >= 1, got {self.ref_model_sync_steps}")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.epsilon_high <= 0:
            raise ValueError(f"epsilon_high must be > 0, got {self.epsilon_high}")
        if self.delta is not None and self.delta <= 1:
            raise ValueError(
                f"delta must be > 1 (it caps the probability ratio, which is 1 on-policy), got {self.delta}")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                             f"got {self.importance_sampling_level!r}")
        if self.vllm_importance_sampling_mode not in IMPORTANCE_SAMPLING_MODES:
            raise ValueError(f"vllm_importance_sampling_mode must be one of {IMPORTANCE_SAMPLING_MODES}, "
                             f"got {self.vllm_importance_sampling_mode!r}")
        self._resolve_importance_sampling_bounds()
        if self.off_policy_mask_threshold is not None and self.off_policy_mask_threshold <= 0:
            raise ValueError(f"off_policy_mask_threshold must be > 0 (e.g. 0.5) or None, "
                             f"got {self.off_policy_mask_threshold}")
        self._resolve_generation_batch()

    def _resolve_importance_sampling_bounds(self) -> None:
        cap, clip_max, clip_min = (self.vllm_importance_sampling_cap, self.vllm_importance_sampling_clip_max,
                                   self.vllm_importance_sampling_clip_min)
        if cap is not None:
            # clip_max at its default cannot be told from clip_max not given: the older name then sets it.
            if clip_max not in (cap, DEFAULT_CLIP_MAX):
                raise ValueError(
                    f"vllm_importance_sampling_cap ({cap}) and vllm_importance_sampling_clip_max ({clip_max}) are "
                    "two names of one bound: set only vllm_importance_sampling_clip_max"
                )
            clip_max = self.vllm_importance_sampling_clip_max = cap
        self.vllm_importance_sampling_cap = clip_max
        if clip_max is not None and clip_max <= 0:
            raise ValueError(f"vllm_importance_sampling_clip_max must be > 0 or None, got {clip_max}")
        if clip_min is not None and clip_min < 0:
            raise ValueError(f"vllm_importance_sampling_clip_min must be >= 0 or None, got {clip_min}")
        if clip_min is None and clip_max is None:
            raise ValueError("vllm_importance_sampling_clip_min and vllm_importance_sampling_clip_max are both None, "
                             "leaving the ratio unbounded: set one, or vllm_importance_sampling_correction=False")
        if clip_min is not None and clip_max is not None and clip_min >= clip_max:
            raise ValueError(f"vllm_importance_sampling_clip_min ({clip_min}) must be below "
                             f"vllm_importance_sampling_clip_max ({clip_max})")

    def _resolve_generation_batch(self) -> None:
        num_processes = self.world_size
        step_batch = self.per_device_train_batch_size * num_processes
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError("set generation_batch_size or steps_per_generation, not both")
        if self.generation_batch_size is None:
            if self.steps_per_generation is None:
                self.steps_per_generation = self.gradient_accumulation_steps
            if self.steps_per_generation < 1:
                raise ValueError(f"steps_per_generation must be >= 1, got {self.steps_per_generation}")
            self.generation_batch_size = step_batch * self.steps_per_generation
        else:
            if self.generation_batch_size < 1 or self.generation_batch_size % step_batch:
                raise ValueError(
                    f"generation_batch_size ({self.generation_batch_size}) must be a positive multiple of "
                    f"per_device_train_batch_size ({self.per_device_train_batch_size}) × processes ({num_processes})"
                )
            self.steps_per_generation = self.generation_batch_size // step_batch
        if self.generation_batch_size % self.num_generations:
            raise ValueError(
                f"the global generation batch ({self.generation_batch_size} completions = per_device_train_batch_size "
                f"{self.per_device_train_batch_size} × {num_processes} processes × steps_per_generation "
                f"{self.steps_per_generation}) must be divisible by num_generations ({self.num_generations}); "
                "change one of them"
            )
        if self.eval_strategy != "no":
            eval_batch = self.per_device_eval_batch_size * num_processes
            if eval_batch % self.num_generations_eval:
                raise ValueError(
                    f"the global eval batch ({eval_batch} = per_device_eval_batch_size "
                    f"{self.per_device_eval_batch_size} × {num_processes} processes) must be divisible by "
                    f"num_generations_eval ({self.num_generations_eval})"
                )
