"""OnlineDPOConfig: the Online DPO trainer's arguments, with TRL's names and help texts."""

from __future__ import annotations

from dataclasses import dataclass, field

from flywheel.trainer.rollout_config import RolloutTrainingArguments

DPO_LOSS_TYPES = ("sigmoid", "ipo")


@dataclass
class OnlineDPOConfig(RolloutTrainingArguments):
    """Arguments of `OnlineDPOTrainer`: two completions per prompt, ranked, then a DPO step.

    `per_device_train_batch_size` counts prompts (each gives one chosen/rejected pair).
    """

    learning_rate: float = field(default=5e-7, metadata={"help": "Initial learning rate of AdamW."})
    max_completion_length: int = field(default=64, metadata={"help": "Most tokens generated per completion."})
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Set every dropout of the trained and reference models to 0, attention dropout included, so "
            "that both score a completion the same way in every forward."
        },
    )
    max_length: int | None = field(
        default=512,
        metadata={
            "help": "Maximum total length of the sequence (prompt + completion) used to compute log probabilities. "
            "If the sequence exceeds this limit, the leftmost tokens will be truncated. Generation still sees the "
            "whole prompt (up to max_prompt_length, 512 by default): with the defaults, a prompt of more than 448 "
            "tokens beside 64-token completions is scored on its last tokens only. Must exceed max_completion_length; "
            "None: no limit."
        },
    )
    temperature: float = field(
        default=0.9,
        metadata={
            "help": "Temperature for sampling. The higher the temperature, the more random the completions. The "
            "log probabilities use the same temperature."
        },
    )
    max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "TRL's name for max_completion_length; when set, it wins."},
    )
    beta: list[float] = field(
        default_factory=lambda: [0.1],
        metadata={
            "help": "Strength of the pull towards the reference model: one float, or a list with one value per "
            "epoch (the last value holds for later epochs)."
        },
    )
    loss_type: str = field(
        default="sigmoid",
        metadata={"help": "'sigmoid' (DPO: −log σ(β·h)) or 'ipo' ((h − 1/(2β))²), h the log-ratio margin."},
    )
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={
            "help": "Subtracted from the score of a completion that ends without EOS (reward functions and reward "
            "models only), so that completions learn to finish."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "One weight per reward function when several rank the pair. Default: all 1."},
    )

    @property
    def completions_per_rollout(self) -> int:
        return 2 * self.per_device_train_batch_size  # two completions of each prompt

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None:
            self.max_completion_length = self.max_new_tokens
        super().__post_init__()
        self.max_new_tokens = self.max_completion_length
        if isinstance(self.beta, (int, float)):
            self.beta = float(self.beta)
        elif len(self.beta) == 1:
            self.beta = float(self.beta[0])
        betas = [self.beta] if isinstance(self.beta, float) else list(self.beta)
        if not betas or any(b <= 0 for b in betas):
            raise ValueError(f"beta must be > 0 (one float or one per epoch), got {self.beta}")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(f"missing_eos_penalty must be >= 0, got {self.missing_eos_penalty}")
        if self.max_length is not None and self.max_length <= self.max_completion_length:
            raise ValueError(
                f"max_length ({self.max_length}) must exceed max_completion_length ({self.max_completion_length}) "
                "to leave room for the prompt: raise max_length, lower max_completion_length (max_new_tokens), or "
                "set max_length to None"
            )

    def beta_at(self, epoch: float) -> float:
        """β for the given (fractional) epoch."""
        if isinstance(self.beta, float):
            return self.beta
        return self.beta[min(int(epoch), len(self.beta) - 1)]
