"""The demo task: add two small numbers ("37+48=" -> "85"), with an exact-match reward.

Every pair of operands is a problem; a fixed, seeded split sets aside the held-out problems that
neither the warm-up nor the RL run ever sees, so accuracy on them measures a skill, not memory.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

MAX_OPERAND = 99
NUM_HELDOUT = 1000
SPLIT_SEED = 1234
MAX_ANSWER_TOKENS = 8  # the longest answer, 198, is 3 tokens and the eos a fourth


@dataclass(frozen=True)
class Problem:
    """One addition: the prompt the model sees and the answer it must write."""

    left: int
    right: int

    @property
    def prompt(self) -> str:
        return f"{self.left}+{self.right}="

    @property
    def answer(self) -> str:
        return str(self.left + self.right)


def _all_problems_shuffled() -> list[Problem]:
    problems = [Problem(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    random.Random(SPLIT_SEED).shuffle(problems)
    return problems


def heldout_problems(count: int = NUM_HELDOUT) -> list[Problem]:
    """The first `count` held-out problems (always the same ones, in the same order)."""
    if not 1 <= count <= NUM_HELDOUT:
        raise ValueError(f"count must be between 1 and {NUM_HELDOUT}, got {count}")
    return _all_problems_shuffled()[:count]


def train_problems(count: int, seed: int) -> list[Problem]:
    """`count` problems drawn (with replacement, seeded) from those outside the held-out set."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    pool = _all_problems_shuffled()[NUM_HELDOUT:]
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(count)]


def parse_answer(completion: str) -> str:
    """The answer a completion gives: its text up to the first newline, without surrounding spaces."""
    return completion.split("\n", 1)[0].strip()


def exact_match_reward(completions: list[str], answer: list[str], **_columns) -> list[float]:
    """1.0 where the completion's answer equals the dataset's `answer` column, else 0.0.

    A GRPO reward function: the trainer passes the decoded completions and, by keyword, the
    dataset's other columns (here `answer`).
    """
    return [float(parse_answer(completion) == expected) for completion, expected in zip(completions, answer)]
