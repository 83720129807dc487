"""Rollout throughput through a real `flywheel serve` process, for tensor × data-parallel layouts.

One layout:
    python -m bench.serve_throughput --shape qwen2.5-0.5b --device cuda --tensor-parallel-size 1 --data-parallel-size 2
A sweep, each layout against the tp1×dp1 baseline of the same run (1x1 is added when missing):
    python -m bench.serve_throughput --shape qwen2.5-1.5b --device cuda --layouts 1x1 1x2 1x4 2x2 4x1 --out $OUT/dp.json
    python -m bench.serve_throughput --device cpu --shape tiny --layouts 1x1 1x2 2x1

A layout `TxD` is tensor_parallel_size T × data_parallel_size D; on the GPU it takes the first T×D
visible GPUs. Several client threads send their share of the workload's prompts at once, so every
data-parallel engine stays busy. The server has no random-weight load format, so a random-weight
safetensors checkpoint of the shape is written first (--model-dir keeps it for the next run).
Generation ignores EOS: every sequence runs its full length. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.shapes import SHAPES, WORKLOADS, model_config
from bench.shapes import write_checkpoint
from flywheel import GenerationClient
from flywheel.server.launch import launch_server


def parse_layout(text: str) -> tuple[int, int]:
    """'2x4' -> (tensor_parallel_size 2, data_parallel_size 4)."""
    try:
        tp, dp = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a layout is TPxDP, e.g. 2x4, got {text!r}") from None
    if tp < 1 or dp < 1:
        raise argparse.ArgumentTypeError(f"tp and dp must be >= 1, got {text!r}")
    return tp, dp


def ensure_checkpoint(folder: Path, shape: str, dtype: torch.dtype) -> Path:
    """A random-weight checkpoint of `shape` in `folder`, written unless one is already there."""
    if not (folder / "config.json").exists() or not any(folder.glob("*.safetensors")):
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        write_checkpoint(folder, shape, dtype)  # the returned model is dropped at once
        print(f"wrote a random {shape} checkpoint to {folder} in {time.perf_counter() - started:.0f}s", flush=True)
    return folder


def visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def split_for_clients(requests: list[tuple[list[int], int]], clients: int) -> list[list[tuple[list[int], int]]]:
    """Deal the prompts round-robin to the client threads (empty shares dropped)."""
    shares = [requests[i::clients] for i in range(clients)]
    return [share for share in shares if share]


def client_thread(base_url: str, share: list[tuple[list[int], int]], n: int, temperature: float,
                  counts: list[int], errors: list[BaseException]) -> None:
    """Send one request per distinct max_tokens in this share; add up the completion tokens."""
    by_length: dict[int, list[list[int]]] = defaultdict(list)
    for prompt, max_tokens in share:
        by_length[max_tokens].append(prompt)
    try:
        client = GenerationClient(base_url=base_url, connection_timeout=60.0, request_timeout=3600.0)
        for max_tokens, prompts in by_length.items():
            out = client.generate(prompts, n=n, temperature=temperature, top_p=1.0, max_tokens=max_tokens,
                                  logprobs=0, generation_kwargs={"ignore_eos": True})
            counts.append(sum(len(ids) for ids in out["completion_ids"]))
        client.http.close()
    except BaseException as error:  # surfaced by the caller, which knows the layout
        errors.append(error)


def drive(base_url: str, requests: list[tuple[list[int], int]], n: int, temperature: float,
          clients: int) -> tuple[int, float]:
    """Run the workload from `clients` threads at once; returns (completion tokens, seconds)."""
    counts: list[int] = []
    errors: list[BaseException] = []
    threads = [threading.Thread(target=client_thread, args=(base_url, share, n, temperature, counts, errors))
               for share in split_for_clients(requests, clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"a client thread failed: {type(errors[0]).__name__}: {errors[0]}") from errors[0]
    return sum(counts), elapsed


def run_layout(args, checkpoint: Path, tp: int, dp: int, requests, log_dir: Path) -> dict:
    """Start a server of this layout, warm every engine up, run the workload, stop the server."""
    workload = WORKLOADS[args.workload]
    options = dict(tensor_parallel_size=tp, data_parallel_size=dp, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                   max_model_len=args.max_model_len or max(len(p) for p, _ in requests) + max(t for _, t in requests),
                   log_level="warning")
    if args.device == "cuda":
        env = {"CUDA_VISIBLE_DEVICES": ",".join(visible_gpus()[: tp * dp])}
        options["gpu_memory_utilization"] = args.gpu_memory_utilization
    else:
        env = {"CUDA_VISIBLE_DEVICES": ""}
        options["kv_cache_memory_gb"] = args.kv_cache_gb
    if args.enforce_eager:
        options["enforce_eager"] = True
    log_path = log_dir / f"server-tp{tp}-dp{dp}.log"
    started = time.perf_counter()
    with launch_server(str(checkpoint), timeout_s=args.startup_timeout, log_path=log_path, env=env,
                       **options) as server:
        startup = time.perf_counter() - started
        # Warm-up: enough short requests that every engine has run a prefill and decodes (CUDA graphs).
        warm = [(prompt, 4) for prompt, _ in requests[: 2 * dp]]
        drive(server.base_url, warm, workload.n, workload.temperature, clients=2 * dp)
        tokens, seconds = drive(server.base_url, requests, workload.n, workload.temperature, args.clients)
    return {"layout": f"{tp}x{dp}", "tp": tp, "dp": dp, "ranks": tp * dp, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "startup_s": startup}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--workload", choices=list(WORKLOADS), default=None,
                        help="default: rollout on cuda, cpu-rollout on cpu")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--data-parallel-size", type=int, default=1)
    parser.add_argument("--layouts", nargs="+", type=parse_layout, default=None,
                        help="TPxDP layouts to sweep (overrides the two sizes above), e.g. 1x1 1x2 2x1")
    parser.add_argument("--clients", type=int, default=8, help="client threads sending requests at once")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--max-num-seqs", type=int, default=512, help="per engine")
    parser.add_argument("--max-model-len", type=int, default=None, help="default: longest prompt + max_tokens")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--kv-cache-gb", type=float, default=0.25, help="KV cache per engine on the CPU")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--model-dir", default=None,
                        help="checkpoint folder to reuse (written there when missing); default: a temporary one")
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args()
    args.workload = args.workload or ("rollout" if args.device == "cuda" else "cpu-rollout")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    layouts = args.layouts or [(args.tensor_parallel_size, args.data_parallel_size)]
    if (1, 1) not in layouts:
        layouts = [(1, 1)] + layouts
    heads = model_config(args.shape).num_attention_heads
    if any(heads % tp for tp, _ in layouts):
        raise SystemExit(f"{args.shape} has {heads} attention heads: tensor_parallel_size must divide them, got "
                         f"{sorted({tp for tp, _ in layouts if heads % tp})}")
    if args.device == "cuda":
        needed, have = max(tp * dp for tp, dp in layouts), len(visible_gpus())
        if needed > have:
            raise SystemExit(f"the layouts need {needed} GPUs but {have} are visible; drop the larger layouts")

    workload = WORKLOADS[args.workload]
    requests = workload.requests(model_config(args.shape).vocab_size)
    with tempfile.TemporaryDirectory(prefix="flywheel-serve-bench-") as tmp:
        folder = Path(args.model_dir) if args.model_dir else Path(tmp) / args.shape
        checkpoint = ensure_checkpoint(folder, args.shape, getattr(torch, args.dtype))
        results = []
        for tp, dp in layouts:
            print(f"layout tp={tp} dp={dp} ...", flush=True)
            results.append(run_layout(args, checkpoint, tp, dp, requests, Path(tmp)))
            print(f"  {results[-1]['tokens_per_s']:,.0f} tokens/s", flush=True)

    baseline = next(r for r in results if r["layout"] == "1x1")["tokens_per_s"]
    for result in results:
        result["speedup"] = result["tokens_per_s"] / baseline
        result["efficiency"] = result["speedup"] / result["ranks"]
    summary = {
        "shape": args.shape, "workload": args.workload, "device": args.device, "dtype": args.dtype,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "cpu_count": os.cpu_count(), "clients": args.clients, "layouts": results,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    unit = "GPU" if args.device == "cuda" else "rank"
    print(f"\n{args.shape}, {args.workload}, {args.device} ({summary['device_name']}), {args.dtype}, "
          f"{args.clients} client threads")
    print(f"{'layout':<8}{'ranks':>6}{'tokens':>10}{'seconds':>9}{'tokens/s':>11}{'speedup':>9}"
          f"{'per-' + unit + ' eff.':>15}{'startup s':>11}")
    for r in results:
        print(f"{'tp' + str(r['tp']) + 'dp' + str(r['dp']):<8}{r['ranks']:>6}{r['tokens']:>10,}{r['seconds']:>9.2f}"
              f"{r['tokens_per_s']:>11,.0f}{r['speedup']:>8.2f}x{r['efficiency']:>15.2f}{r['startup_s']:>11.1f}")


if __name__ == "__main__":
    main()
