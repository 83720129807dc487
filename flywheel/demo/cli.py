"""`flywheel demo`: train the shipped small model with GRPO on the CPU and show that it learned.

The model (flywheel/demo/base_model, made by `python -m flywheel.demo.make_base_model`) adds two
numbers below 100 but often forgets to carry. GRPO with an exact-match reward, rollouts from the
engine colocated in the training process, teaches it to carry; held-out accuracy is measured
before and after.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from flywheel.demo.evaluate import heldout_accuracy
from flywheel.demo.make_base_model import BASE_MODEL_DIR
from flywheel.demo.report import ProgressAndMetrics, plot_reward_curve, results_table
from flywheel.demo.task import MAX_ANSWER_TOKENS, NUM_HELDOUT, exact_match_reward, heldout_problems, train_problems

PROMPTS_PER_STEP = 16
NUM_GENERATIONS = 8
LEARNING_RATE = 1e-4
DEFAULT_MAX_STEPS = 200
MAX_PROMPT_TOKENS = 16


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="flywheel demo",
        description=(
            "Train the shipped small model (it adds numbers below 100 but often forgets to carry) with GRPO on "
            "the CPU: an exact-match reward, rollouts from flywheel's engine colocated in the training process. "
            "Shows a progress bar with the running reward, then the held-out accuracy before and after. Writes "
            "metrics.jsonl, reward_curve.png, results.json and the trained model under --output-dir."
        ),
    )
    parser.add_argument(
        "--max-steps", type=int, default=DEFAULT_MAX_STEPS,
        help=f"GRPO optimizer steps, each on {PROMPTS_PER_STEP} prompts x {NUM_GENERATIONS} completions "
        f"(default {DEFAULT_MAX_STEPS}; fewer steps, smaller gain)",
    )
    parser.add_argument(
        "--output-dir", type=Path, default=Path("flywheel-demo"),
        help="folder for the metrics, the reward curve, the results and the trained model (default ./flywheel-demo)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the training prompts, sampling and trainer (default 0)"
    )
    parser.add_argument(
        "--eval-problems", type=int, default=NUM_HELDOUT,
        help=f"held-out problems to measure accuracy on, 1 to {NUM_HELDOUT} (default {NUM_HELDOUT})",
    )
    parser.add_argument(
        "--report-to", default="none",
        help="where the trainer also sends its logs, as transformers' report_to: none, tensorboard (under "
        "OUTPUT_DIR/runs), wandb, all (default none; metrics.jsonl is always written)",
    )
    args = parser.parse_args(argv)
    if args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps}")
    if not 1 <= args.eval_problems <= NUM_HELDOUT:
        parser.error(f"--eval-problems must be between 1 and {NUM_HELDOUT}, got {args.eval_problems}")
    return args


def train(base_model: str, output_dir: Path, max_steps: int, seed: int, report_to: str) -> Path:
    """Run GRPO from `base_model`; returns the folder of the trained model."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    from flywheel import GRPOConfig, GRPOTrainer

    problems = train_problems(max_steps * PROMPTS_PER_STEP, seed=seed)
    dataset = Dataset.from_dict({"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]})
    config = GRPOConfig(
        output_dir=str(output_dir),
        use_vllm=True,
        vllm_mode="colocate",
        use_cpu=True,
        num_generations=NUM_GENERATIONS,
        per_device_train_batch_size=PROMPTS_PER_STEP * NUM_GENERATIONS,
        max_prompt_length=MAX_PROMPT_TOKENS,
        max_completion_length=MAX_ANSWER_TOKENS,
        vllm_kv_cache_memory_gb=0.1,
        temperature=1.0,
        learning_rate=LEARNING_RATE,
        max_steps=max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to=report_to,
        seed=seed,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=base_model,
        args=config,
        reward_funcs=exact_match_reward,
        train_dataset=dataset,
        callbacks=[ProgressAndMetrics(output_dir / "metrics.jsonl")],
    )
    # The progress bar replaces the Trainer's printing of every log dict.
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    model_dir = output_dir / "model"
    trainer.save_model(str(model_dir))
    return model_dir


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    threads, progress_bars = torch.get_num_threads(), transformers_logging.is_progress_bar_enabled()
    # One progress bar (GRPO's), not one per checkpoint load and save.
    transformers_logging.disable_progress_bar()
    # The model is so small that a second thread gains little, and threads that wait on each other
    # slow down many-fold when other processes share the cores.
    torch.set_num_threads(1)
    try:
        run_demo(args)
    finally:
        torch.set_num_threads(threads)
        if progress_bars:
            transformers_logging.enable_progress_bar()
    return 0


def run_demo(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    heldout = heldout_problems(args.eval_problems)
    start = time.perf_counter()

    print("flywheel demo: a small Qwen2 adds numbers below 100 but often forgets to carry; GRPO on the CPU fixes that")
    before = heldout_accuracy(str(BASE_MODEL_DIR), heldout, seed=args.seed)
    print(f"held-out accuracy before training: {before.greedy:.1%} greedy, {before.sampled:.1%} sampled")
    print(f"training: {args.max_steps} steps x {PROMPTS_PER_STEP} prompts x {NUM_GENERATIONS} completions, "
          "rollouts from the engine in this process")
    model_dir = train(str(BASE_MODEL_DIR), args.output_dir, args.max_steps, args.seed, args.report_to)
    after = heldout_accuracy(str(model_dir), heldout, seed=args.seed)
    wall_seconds = time.perf_counter() - start

    metrics_path = args.output_dir / "metrics.jsonl"
    plot_reward_curve(metrics_path, args.output_dir / "reward_curve.png", before, after)
    results = {
        "before": asdict(before),
        "after": asdict(after),
        "max_steps": args.max_steps,
        "seed": args.seed,
        "wall_seconds": round(wall_seconds, 1),
    }
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(results_table(before, after))
    print(f"\n{args.max_steps} steps in {wall_seconds / 60:.1f} min. Wrote {args.output_dir}/: metrics.jsonl, "
          "reward_curve.png, results.json, model/")
