"""Where one decode step's time goes: GPU kernels, launch gaps and host work, for a workload.

    python -m bench.profile_step --workload rollout --shape qwen2.5-0.5b --out $OUT/profile.json

Runs the whole workload once (its wall time), then the workload's prefill and a few decode steps
under torch.profiler: the step's wall time, the time the GPU was busy with kernels, and the largest
kernels. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench.shapes import WORKLOADS, model_config, model_folder
from flywheel import LLM, SamplingParams


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
    # The whole workload once, for the time outside the steady decode steps profiled below.
    steps_before = engine.stats.steps
    torch.cuda.synchronize()
    started = time.perf_counter()
    llm.generate([p for p, _ in requests], [SamplingParams(n=workload.n, max_tokens=t, ignore_eos=True) for _, t in requests])
    torch.cuda.synchronize()
    full_run_s = time.perf_counter() - started
    full_run_steps = engine.stats.steps - steps_before
    for index, (prompt, tokens) in enumerate(requests):
        engine.add_request(str(index), prompt, SamplingParams(n=workload.n, max_tokens=tokens, ignore_eos=True))
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
    top = sorted(kernels.items(), key=lambda item: -item[1])[:12]
    result = {
        "workload": args.workload, "shape": args.shape, "batch": len(engine.scheduler.running),
        "step_wall_ms": wall_ms, "gpu_kernel_ms": gpu_ms, "gaps_and_host_ms": wall_ms - gpu_ms,
        "top_kernels_ms": dict(top), "cuda_graphs": engine.runner.decode_graphs is not None,
        "full_run_s": full_run_s, "full_run_steps": full_run_steps,
    }
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    for name, ms in top:
        print(f"{ms:8.3f} ms  {name[:100]}")
    print(f"\nbatch {result['batch']}: step {wall_ms:.2f} ms wall, {gpu_ms:.2f} ms of GPU kernels, "
          f"{wall_ms - gpu_ms:.2f} ms of launch gaps and host work (graphs: {result['cuda_graphs']})")
    print(f"whole workload: {full_run_s:.3f} s in {full_run_steps} steps, "
          f"{full_run_s - full_run_steps * wall_ms / 1000:.3f} s more than that many steady decode steps")


if __name__ == "__main__":
    main()
