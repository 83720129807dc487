"""Where one decode step's time goes: GPU kernels, launch gaps and host work, for a workload.

    python -m bench.profile_step --workload rollout --shape qwen2.5-0.5b --out $OUT/profile.json

Runs the whole workload twice step by step (the wall time of every step), then the workload's
prefill and a few decode steps under torch.profiler: the step's wall time, the time the GPU was busy
with kernels, the largest kernels and the host's time in CUDA runtime calls. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from bench.shapes import WORKLOADS, model_config, model_folder
from flywheel import LLM, SamplingParams


def run_timed(engine, requests, params: SamplingParams) -> list[float]:
    """Run the workload's requests to the end; the wall time of every engine step, in ms."""
    for index, (prompt, tokens) in enumerate(requests):
        engine.add_request(f"t{index}", prompt, replace(params, max_tokens=tokens))
    step_ms = []
    torch.cuda.synchronize()
    while engine.has_unfinished_requests():
        started = time.perf_counter()
        engine.step()
        step_ms.append((time.perf_counter() - started) * 1000)
    torch.cuda.synchronize()
    return step_ms


def slowest_steps(step_ms: list[float], count: int = 6) -> str:
    slowest = sorted(range(len(step_ms)), key=lambda i: -step_ms[i])[:count]
    return ", ".join(f"#{i} {step_ms[i]:.1f} ms" for i in slowest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=list(WORKLOADS), default="rollout")
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    workload = WORKLOADS[args.workload]
    llm = LLM(model_folder(args.shape), load_format="dummy", max_num_seqs=512, enforce_eager=args.enforce_eager)
    engine = llm.engine
    requests = workload.requests(model_config(args.shape).vocab_size)
    params = SamplingParams(n=workload.n, ignore_eos=True)
    # After bench.throughput's warm-up (the whole batch for 4 tokens), the whole workload step by step,
    # twice (prompts not cached): the first pass is what bench.throughput times; the second shows
    # where the time outside steady decode goes once everything has run once.
    llm.generate([p for p, _ in requests], [replace(params, max_tokens=4) for _ in requests])  # as bench.throughput
    engine.reset_prefix_cache()
    first_pass_ms = run_timed(engine, requests, params)
    engine.reset_prefix_cache()
    step_ms = run_timed(engine, requests, params)
    full_run_s = sum(step_ms) / 1000
    for index, (prompt, tokens) in enumerate(requests):
        engine.add_request(f"p{index}", prompt, replace(params, max_tokens=tokens))
    while engine.scheduler.waiting or any(s.pending_forks for s in engine.scheduler.running):
        engine.step()
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - started) * 1000 / args.steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    kernels = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name] += event.device_time / 1000 / args.steps
    gpu_ms = sum(kernels.values())
    # The host's calls into the CUDA runtime: a long copy or launch means the host waited there.
    runtime = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("cuda") and event.device_type == torch.autograd.DeviceType.CPU:
            runtime[event.key] += event.self_cpu_time_total / 1000 / args.steps
    top = sorted(kernels.items(), key=lambda item: -item[1])[:12]
    result = {
        "workload": args.workload, "shape": args.shape, "batch": len(engine.scheduler.running),
        "step_wall_ms": wall_ms, "gpu_kernel_ms": gpu_ms, "gaps_and_host_ms": wall_ms - gpu_ms,
        "top_kernels_ms": dict(top), "runtime_calls_ms": dict(runtime), "cuda_graphs": engine.runner.decode_graphs is not None,
        "full_run_s": full_run_s, "full_run_steps": len(step_ms), "full_run_step_ms": step_ms,
        "first_pass_s": sum(first_pass_ms) / 1000, "first_pass_step_ms": first_pass_ms,
    }
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    for name, ms in top:
        print(f"{ms:8.3f} ms  {name[:100]}")
    for name, ms in sorted(runtime.items(), key=lambda item: -item[1])[:6]:
        print(f"{ms:8.3f} ms  host in {name}")
    print(f"\nbatch {result['batch']}: step {wall_ms:.2f} ms wall, {gpu_ms:.2f} ms of GPU kernels, "
          f"{wall_ms - gpu_ms:.2f} ms of launch gaps and host work (graphs: {result['cuda_graphs']})")
    print(f"whole workload: {full_run_s:.3f} s in {len(step_ms)} steps, "
          f"{full_run_s - len(step_ms) * wall_ms / 1000:.3f} s more than that many steady decode steps; "
          f"slowest steps: {slowest_steps(step_ms)}")
    print(f"first pass: {sum(first_pass_ms) / 1000:.3f} s; slowest steps: {slowest_steps(first_pass_ms)}")

if __name__ == "__main__":
    main()
