"""The `log_completions` sample: the last generation's prompts, completions, rewards and advantages as text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class CompletionSample:
    step: int
    prompts: list[Any]
    completions: list[Any]
    rewards: dict[str, list[float]]  # per reward function, one value per completion (NaN: abstained)
    advantages: list[float]

    def render(self, limit: int | None = None) -> str:
        """`limit` completions (all by default), each with its prompt, rewards and advantage."""
        shown = len(self.completions) if limit is None else min(limit, len(self.completions))
        lines = [f"completions at step {self.step} ({shown} of {len(self.completions)}):"]
        for row in range(shown):
            rewards = ", ".join(f"{name} {values[row]:.4g}" for name, values in self.rewards.items())
            lines.append(f"[{row + 1}] advantage {self.advantages[row]:.4g} | {rewards}")
            lines.append(f"    prompt: {_text(self.prompts[row])}")
            lines.append(f"    completion: {_text(self.completions[row])}")
        return "\n".join(lines)


def _text(value: Any) -> str:
    """A plain prompt or completion as Python writes a string (whitespace visible); a conversation as
    its messages, `role: content` each."""
    if isinstance(value, list):
        return " / ".join(f"{message['role']}: {message['content']!r}" for message in value)
    return repr(value)
