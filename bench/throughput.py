"""Generation throughput of the engine against transformers `generate`, in one run.

    python -m bench.throughput --workload cpu-rollout --shape tiny --device cpu
    python -m bench.throughput --workload rollout --shape qwen2.5-0.5b --device cuda --out $OUT/rollout.json

Random weights (EOS ignored, so every sequence runs its full length). Each side runs --repeats
timed passes and reports the median; on the CPU the two sides take turns. Prints a table last and
writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Generator, Iterator
from dataclasses import replace

import torch
from bench.shapes import SHAPES, WORKLOADS, model_config, model_folder
from transformers import AutoModelForCausalLM

from flywheel import LLM, SamplingParams


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def engine_passes(args, folder: str, requests) -> Iterator[tuple[int, float]]:
    """Builds and warms up the engine, then yields (tokens, seconds) per timed pass; returns its details."""
    workload = WORKLOADS[args.workload]
    options = dict(dtype=args.dtype, device=args.device, load_format="dummy", enforce_eager=args.enforce_eager,
                   max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len)
    if args.kv_cache_gb:
        options["kv_cache_memory_gb"] = args.kv_cache_gb
    started = time.perf_counter()
    llm = LLM(folder, **options)
    startup = time.perf_counter() - started
    params = [
        SamplingParams(n=workload.n, temperature=workload.temperature, top_p=1.0, max_tokens=tokens, ignore_eos=True)
        for _, tokens in requests
    ]
    prompts = [prompt for prompt, _ in requests]
    # Warm-up as the transformers baseline's: the whole batch for 4 tokens; then no prompt is cached.
    llm.generate(prompts, [replace(p, max_tokens=4) for p in params])
    llm.reset_prefix_cache()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(args.repeats):
            synchronize(args.device)
            started = time.perf_counter()
            outputs = llm.generate(prompts, params)
            synchronize(args.device)
            elapsed = time.perf_counter() - started
            llm.reset_prefix_cache()  # every pass prefills its prompts, as the baseline's does
            yield sum(len(c.token_ids) for o in outputs for c in o.outputs), elapsed
        return {
            "startup_s": startup,
            "preemptions": llm.engine.stats.preemptions,
            "kv_blocks": llm.engine.num_blocks,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None,
        }
    finally:
        llm.shutdown()
        del llm
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def transformers_passes(args, requests) -> Iterator[tuple[int, float]]:
    """Builds and warms up the transformers baseline, then yields (tokens, seconds) per timed pass."""
    workload = WORKLOADS[args.workload]
    dtype = {"auto": torch.bfloat16 if args.device.startswith("cuda") else torch.float32}.get(args.dtype) or getattr(torch, args.dtype)
    with torch.device(args.device):  # random init on the device: minutes on the host for a 7b shape
        model = AutoModelForCausalLM.from_config(model_config(args.shape), dtype=dtype).eval()
    if len({len(p) for p, _ in requests}) != 1 or len({t for _, t in requests}) != 1:
        raise SystemExit("the transformers baseline needs equal prompt and completion lengths")
    max_new = requests[0][1]
    prompts = torch.tensor([p for p, _ in requests], device=args.device)
    per_batch = max(1, args.hf_batch // workload.n)

    @torch.no_grad()
    def one_pass(limit: int | None = None) -> int:
        generated = 0
        for start in range(0, len(prompts), per_batch):
            chunk = prompts[start : start + per_batch]
            out = model.generate(
                chunk, attention_mask=torch.ones_like(chunk), do_sample=True, temperature=workload.temperature,
                top_p=1.0, top_k=0, max_new_tokens=limit or max_new, min_new_tokens=limit or max_new,
                num_return_sequences=workload.n, pad_token_id=0,
            )
            generated += out[:, chunk.shape[1]:].numel()
        return generated

    one_pass(limit=4)
    try:
        for _ in range(args.repeats):
            synchronize(args.device)
            started = time.perf_counter()
            generated = one_pass()
            synchronize(args.device)
            yield generated, time.perf_counter() - started
        return {}
    finally:
        del model
        gc.collect()


def measure(sides: dict[str, Generator], interleave: bool) -> dict[str, dict]:
    """Each side's passes, one side after the other or taking turns; per side the median pass and the
    side's own details."""
    passes: dict[str, list[tuple[int, float]]] = {name: [] for name in sides}
    details: dict[str, dict] = {}
    turns = [dict(sides)] if interleave else [{name: side} for name, side in sides.items()]
    for active in turns:
        while active:
            for name, side in list(active.items()):
                try:
                    passes[name].append(next(side))
                except StopIteration as done:
                    details[name] = done.value
                    del active[name]
    return {name: {**median_pass(passes[name]), **details[name]} for name in sides}


def median_pass(passes: list[tuple[int, float]]) -> dict:
    """The median pass by tokens/s, with every pass's figure (a shared machine's noise shows in their spread)."""
    rates = sorted(tokens / seconds for tokens, seconds in passes)
    tokens, rate = passes[0][0], statistics.median(rates)
    return {"tokens": tokens, "seconds": tokens / rate, "tokens_per_s": rate, "passes_tokens_per_s": rates}


def copy_bandwidth(device: str) -> float | None:
    """Device-to-device copy, bytes read + written per second."""
    if not device.startswith("cuda"):
        return None
    source = torch.randn(256 * 2**20, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(20):
        target.copy_(source)
    torch.cuda.synchronize()
    return 2 * source.numel() * 4 * 20 / (time.perf_counter() - started)


def floor_tokens_per_s(args, requests, bandwidth: float | None) -> float | None:
    """Tokens/s if each decode step only read the weights and the KV cache once, at copy bandwidth."""
    if bandwidth is None:
        return None
    config = model_config(args.shape)
    element = 2 if args.dtype in ("auto", "bfloat16", "float16") else 4
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    batch = sum(WORKLOADS[args.workload].n for _ in requests)
    mean_context = sum(len(p) + t / 2 for p, t in requests) / len(requests)
    kv_bytes = batch * mean_context * 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element
    step_seconds = (params * element + kv_bytes) / bandwidth
    return batch / step_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=list(WORKLOADS), default="cpu-rollout")
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--hf-batch", type=int, default=512, help="sequences per transformers generate call")
    parser.add_argument("--skip-hf", action="store_true", help="engine only")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--kv-cache-gb", type=float, default=None)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes of each side (taking turns on the CPU); the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    parser.add_argument("--out", default=None, help="write the JSON result here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = model_folder(args.shape)
    requests = WORKLOADS[args.workload].requests(model_config(args.shape).vocab_size)
    sides = {"engine": engine_passes(args, folder, requests)}
    if not args.skip_hf:
        sides["transformers"] = transformers_passes(args, requests)
    # On the CPU the two sides take turns, so that a slow spell of a shared machine falls on both; a
    # GPU holds one side at a time (the engine takes most of its memory).
    measured = measure(sides, interleave=not args.device.startswith("cuda"))
    engine, baseline = measured["engine"], measured.get("transformers")
    bandwidth = copy_bandwidth(args.device)
    floor = floor_tokens_per_s(args, requests, bandwidth)
    result = {
        "workload": args.workload, "shape": args.shape, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "threads": torch.get_num_threads(), "dtype": args.dtype, "engine": engine, "transformers": baseline,
        "ratio": engine["tokens_per_s"] / baseline["tokens_per_s"] if baseline else None,
        "copy_bandwidth_gbs": bandwidth / 1e9 if bandwidth else None,
        "floor_tokens_per_s": floor,
        "fraction_of_floor": engine["tokens_per_s"] / floor if floor else None,
    }
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
    print(f"\n{'workload':<12} {'shape':<14} {'engine tok/s':>13} {'hf tok/s':>10} {'ratio':>7} {'of floor':>9} {'peak GiB':>9} {'preempt':>8}")
    print(
        f"{args.workload:<12} {args.shape:<14} {engine['tokens_per_s']:>13,.0f} "
        f"{baseline['tokens_per_s'] if baseline else float('nan'):>10,.0f} {result['ratio'] or float('nan'):>7.2f} "
        f"{result['fraction_of_floor'] or float('nan'):>9.3f} {engine['peak_gib'] or float('nan'):>9.2f} {engine['preemptions']:>8}"
    )


if __name__ == "__main__":
    main()
