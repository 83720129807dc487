"""GRPO step benchmark: one GRPO step configuration timed with use_vllm=False, colocate and server, in one run.

The time of each optimizer step is split into generation / reward / train / weight sync (the trainer's
own `time/*` logs); the first `--warmup` steps are left out.

GPU:  python -m bench.grpo_step --model-shape qwen2.5-0.5b --device cuda --prompts 64 --num-generations 8 \
          --max-completion-length 256 --out grpo_step.json
      (server mode runs when a second GPU is visible: the server on GPU 1, the trainer on GPU 0)
CPU:  python -m bench.grpo_step --model-shape tiny --device cpu --prompts 4 --num-generations 4 \
          --max-completion-length 32 --micro-batch 16 --steps 1

Prints a table last and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

from bench.shapes import SHAPES, write_checkpoint
from bench.step_profile import StepProfiler, name_host_functions
from flywheel import GRPOConfig, GRPOTrainer
from flywheel.server.launch import free_port, launch_server
from flywheel.trainer.metrics import PHASES
from flywheel.trainer.rewards import char_fraction_reward

MODES = ("none", "colocate", "server")


class StepClock(TrainerCallback):
    """Wall time of every optimizer step (generation included: it happens inside the step)."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.durations.append(time.perf_counter() - self._start)
        print(f"step {state.global_step}: {self.durations[-1]:.2f} s", flush=True)


def random_prompts(count: int, length: int, seed: int) -> list[str]:
    """Prompts of `length` byte tokens each (the byte tokenizer makes one token per character)."""
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(length)) for _ in range(count)]


def run_mode(mode: str, checkpoint: str, options: argparse.Namespace, workdir: Path, server_port: int | None) -> dict:
    completions = options.prompts * options.num_generations
    if completions % options.micro_batch:
        raise ValueError(f"--micro-batch {options.micro_batch} must divide prompts × generations = {completions}")
    on_gpu = options.device.startswith("cuda")
    placement = {
        "none": {},
        "colocate": dict(use_vllm=True, vllm_mode="colocate",
                         vllm_gpu_memory_utilization=options.gpu_memory_utilization,
                         vllm_kv_cache_memory_gb=None if on_gpu else 1.0),
        "server": dict(use_vllm=True, vllm_mode="server", vllm_server_host="127.0.0.1", vllm_server_port=server_port,
                       vllm_group_port=free_port()),
    }[mode]
    args = GRPOConfig(
        output_dir=str(workdir / mode), per_device_train_batch_size=options.micro_batch,
        gradient_accumulation_steps=completions // options.micro_batch, num_generations=options.num_generations,
        max_prompt_length=options.prompt_length, max_completion_length=options.max_completion_length,
        max_steps=options.warmup + options.steps, logging_steps=1, learning_rate=1e-6, bf16=on_gpu,
        use_cpu=not on_gpu, gradient_checkpointing=options.gradient_checkpointing, torch_compile=options.torch_compile,
        pack_prompts=options.pack_prompts, report_to="none",
        save_strategy="no", disable_tqdm=True, seed=options.seed, **placement,
    )
    dataset = Dataset.from_dict({"prompt": random_prompts(options.prompts * (options.warmup + options.steps),
                                                          options.prompt_length, options.seed)})
    clock = StepClock()
    callbacks = [clock]
    profiler = None
    if options.profile:
        if options.steps < 3 or not on_gpu:
            raise ValueError("--profile needs a GPU and --steps >= 3 (a profiler for each of the last two)")
        last = options.warmup + options.steps - 1
        if not options.profile_device_only:
            name_host_functions()
        profiler = StepProfiler(torch_step=last - 1, out_prefix=Path(options.out).with_suffix(f".{mode}"),
                                device_only=options.profile_device_only)
        callbacks.append(profiler)
    trainer = GRPOTrainer(model=checkpoint, reward_funcs=char_fraction_reward("aeiou"), args=args,
                          train_dataset=dataset, callbacks=callbacks)
    try:
        trainer.train()
    finally:
        trainer.rollout.close()
    # The profiled steps (the last two) run slower and are left out of the figures.
    timed = slice(options.warmup, options.warmup + options.steps - (2 if options.profile else 0))
    logs = [entry for entry in trainer.state.log_history if "time/generation" in entry][timed]
    result = {"mode": mode, "step_s": statistics.mean(clock.durations[timed])}
    for phase in PHASES:
        result[f"{phase}_s"] = statistics.mean(entry[f"time/{phase}"] for entry in logs)
    result["completion_tokens_per_step"] = statistics.mean(
        entry["completions/mean_length"] * completions for entry in logs)
    if "sampling/sampling_logp_difference/mean" in logs[-1]:
        result["logp_gap_mean"] = logs[-1]["sampling/sampling_logp_difference/mean"]
    if profiler is not None:
        print(f"\n{mode}:", *profiler.summary, sep="\n")
    del trainer
    gc.collect()
    if on_gpu:
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def report(options: argparse.Namespace, results: list[dict]) -> None:
    """Write the JSON report and print the table of the modes run so far."""
    on_gpu = options.device.startswith("cuda")
    baseline = next((r["step_s"] for r in results if r["mode"] == "none"), None)
    for result in results:
        result["speedup_vs_none"] = baseline / result["step_s"] if baseline else None
    summary = {"model_shape": options.model_shape, "device": options.device,
              "gpu": torch.cuda.get_device_name(0) if on_gpu else None, "prompts": options.prompts,
              "num_generations": options.num_generations, "prompt_length": options.prompt_length,
              "max_completion_length": options.max_completion_length, "micro_batch": options.micro_batch,
              "pack_prompts": options.pack_prompts, "steps": options.steps, "results": results}
    Path(options.out).write_text(json.dumps(summary, indent=2))

    header = f"{'mode':<9} {'step s':>8} {'gen s':>8} {'reward s':>9} {'train s':>8} {'sync s':>8} {'vs none':>8}"
    print(f"\nGRPO step: {options.model_shape} on {options.device}, {options.prompts} prompts × "
          f"{options.num_generations}, {options.prompt_length} → {options.max_completion_length} tokens")
    print(header)
    for r in results:
        speedup = f"{r['speedup_vs_none']:.2f}x" if r["speedup_vs_none"] else "-"
        print(f"{r['mode']:<9} {r['step_s']:>8.2f} {r['generation_s']:>8.2f} {r['reward_s']:>9.3f} "
              f"{r['train_s']:>8.2f} {r['weight_sync_s']:>8.3f} {speedup:>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=64, help="distinct prompts per step")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--max-completion-length", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=32, help="completions per forward/backward")
    parser.add_argument("--steps", type=int, default=2, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="colocate engine's share")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--torch-compile", action="store_true", help="train a compiled model (both modes)")
    parser.add_argument("--pack-prompts", action="store_true",
                        help="train each group packed behind one copy of its prompt (both modes)")
    parser.add_argument("--profile", action="store_true",
                        help="profile the last two timed steps (kernels per phase and the GPU's idle time by "
                             "host function, then host functions)")
    parser.add_argument("--profile-device-only", action="store_true",
                        help="with --profile: record the GPU's kernels only, so that the host runs at its own "
                             "speed and the GPU's idle stretches are the unprofiled ones")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="grpo_step.json")
    options = parser.parse_args(argv)

    on_gpu = options.device.startswith("cuda")
    modes = list(options.modes)
    if "server" in modes and on_gpu and torch.cuda.device_count() < 2:
        print("server mode skipped: it needs a second GPU for the server", file=sys.stderr)
        modes.remove("server")
    results = []
    with tempfile.TemporaryDirectory(prefix="flywheel-grpo-bench-") as tmp:
        workdir = Path(tmp)
        checkpoint = str(workdir / "model")
        write_checkpoint(checkpoint, options.model_shape, torch.bfloat16 if on_gpu else torch.float32, options.seed)
        for mode in modes:
            if mode == "server":
                server_options = dict(dtype="bfloat16", env={"CUDA_VISIBLE_DEVICES": "1"}) if on_gpu else \
                    dict(kv_cache_memory_gb=1.0)
                with launch_server(checkpoint, log_path=workdir / "server.log", log_level="warning",
                                   **server_options) as server:
                    results.append(run_mode(mode, checkpoint, options, workdir, server.port))
            else:
                results.append(run_mode(mode, checkpoint, options, workdir, None))
            # After every mode, so that a run cut short still reports the modes it finished.
            report(options, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
