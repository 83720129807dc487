"""What the demo shows: a progress bar with the running reward, metrics as JSON lines, a reward curve, a table."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback

from flywheel.demo.evaluate import Accuracy

REWARD_KEY = "reward"
RUNNING_WINDOW = 10


class ProgressAndMetrics(TrainerCallback):
    """A tqdm bar over optimizer steps showing the running mean reward; every log written as a JSON line."""

    def __init__(self, metrics_path: Path) -> None:
        self.metrics_path = metrics_path
        self.recent_rewards: deque[float] = deque(maxlen=RUNNING_WINDOW)
        self.bar: tqdm | None = None

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self.metrics_path.write_text("")
        self.bar = tqdm(total=state.max_steps, desc="GRPO", unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs) -> None:
        logs = logs or {}
        with self.metrics_path.open("a") as metrics_file:
            metrics_file.write(json.dumps({"step": state.global_step, **logs}) + "\n")
        if REWARD_KEY in logs and self.bar is not None:
            self.recent_rewards.append(logs[REWARD_KEY])
            running = sum(self.recent_rewards) / len(self.recent_rewards)
            self.bar.set_postfix(reward=f"{running:.3f}")

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.bar is not None:
            self.bar.close()


def read_rewards(metrics_path: Path) -> tuple[list[int], list[float]]:
    """The (steps, mean rewards) of the training logs in a metrics JSON-lines file."""
    steps, rewards = [], []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if REWARD_KEY in record:
            steps.append(record["step"])
            rewards.append(record[REWARD_KEY])
    return steps, rewards


def plot_reward_curve(metrics_path: Path, image_path: Path, before: Accuracy, after: Accuracy) -> None:
    """Save a PNG of the mean reward per step and its running mean, titled with the held-out accuracies."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps, rewards = read_rewards(metrics_path)
    windows = [rewards[max(0, i - RUNNING_WINDOW + 1) : i + 1] for i in range(len(rewards))]
    running = [sum(window) / len(window) for window in windows]
    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot(steps, rewards, color="tab:blue", alpha=0.35, label="mean reward of the step")
    axes.plot(steps, running, color="tab:blue", label=f"running mean ({RUNNING_WINDOW} steps)")
    axes.set_xlabel("optimizer step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("exact-match reward (sampled, temperature 1)")
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    axes.set_title(f"held-out greedy accuracy {before.greedy:.1%} → {after.greedy:.1%}")
    figure.tight_layout()
    figure.savefig(image_path, dpi=120)
    plt.close(figure)


def results_table(before: Accuracy, after: Accuracy) -> str:
    """A plain-text table of the held-out accuracies before and after training."""
    rows = [
        ("greedy", before.greedy, after.greedy),
        (f"sampled (temperature 1, {before.k} per problem)", before.sampled, after.sampled),
        (f"pass@{before.k}", before.pass_at_k, after.pass_at_k),
    ]
    width = max(len(name) for name, _, _ in rows)
    lines = [
        f"Held-out accuracy ({before.num_problems} problems never trained on)",
        f"{'':<{width}}  {'before':>7}  {'after':>7}  {'change':>7}",
    ]
    for name, first, second in rows:
        lines.append(f"{name:<{width}}  {first:>7.1%}  {second:>7.1%}  {_points(second - first):>7}")
    return "\n".join(lines)


def _points(difference: float) -> str:
    return f"{'+' if difference >= 0 else '-'}{abs(difference) * 100:.1f}"

