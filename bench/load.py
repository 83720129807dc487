"""Server load benchmark: the same requests sent one at a time, then by several clients at once.

Concurrent clients share the engines' batches (continuous batching across requests), so their
throughput should be well above the one-at-a-time baseline measured in the same run.

    python -m bench.load --shape tiny --clients 8 --requests 32 --prompts-per-request 2 --max-tokens 32

Prints a table last and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.shapes import SHAPES, model_config
from bench.weight_sync import write_checkpoint
from flywheel import GenerationClient
from flywheel.server.launch import launch_server


def make_requests(count: int, prompts_per_request: int, prompt_len: int, vocab: int, seed: int) -> list:
    rng = random.Random(seed)
    return [[[rng.randrange(vocab) for _ in range(prompt_len)] for _ in range(prompts_per_request)]
            for _ in range(count)]


def run_clients(base_url: str, requests: list, clients: int, max_tokens: int) -> dict:
    """Send `requests` from `clients` threads (round robin); wall time, tokens and per-request latency."""
    latencies: list[float] = []
    generated = [0]
    lock = threading.Lock()

    def work(mine: list) -> None:
        with GenerationClient(base_url=base_url, connection_timeout=30) as client:
            for prompts in mine:
                start = time.perf_counter()
                out = client.generate(prompts, max_tokens=max_tokens, temperature=1.0, logprobs=None,
                                      generation_kwargs={"ignore_eos": True})
                with lock:
                    latencies.append(time.perf_counter() - start)
                    generated[0] += sum(len(ids) for ids in out["completion_ids"])

    threads = [threading.Thread(target=work, args=(requests[i::clients],)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {"clients": clients, "wall_s": wall, "tokens": generated[0], "tokens_per_s": generated[0] / wall,
            "latency_p50_s": statistics.median(latencies),
            "latency_p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: random weights of --shape)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompts-per-request", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default="load.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = str(Path(tmp) / args.shape)
            write_checkpoint(Path(model), args.shape, torch.float32)
        vocab = model_config(args.shape).vocab_size if not args.model else 256
        requests = make_requests(args.requests, args.prompts_per_request, args.prompt_len, vocab, seed=0)
        with launch_server(model, log_path=Path(tmp) / "server.log", tensor_parallel_size=args.tp,
                           data_parallel_size=args.dp, timeout_s=900) as server:
            run_clients(server.base_url, requests[:2], 1, args.max_tokens)  # warm-up
            sequential = run_clients(server.base_url, requests, 1, args.max_tokens)
            concurrent = run_clients(server.base_url, requests, args.clients, args.max_tokens)

    result = {"shape": args.shape, "model": args.model, "tp": args.tp, "dp": args.dp, "requests": args.requests,
              "prompts_per_request": args.prompts_per_request, "prompt_len": args.prompt_len,
              "max_tokens": args.max_tokens, "one_at_a_time": sequential, "concurrent": concurrent,
              "speedup": concurrent["tokens_per_s"] / sequential["tokens_per_s"]}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'clients':>8}{'tokens/s':>12}{'p50 s':>10}{'p95 s':>10}")
    for row in (sequential, concurrent):
        print(f"{row['clients']:>8}{row['tokens_per_s']:>12.1f}{row['latency_p50_s']:>10.3f}{row['latency_p95_s']:>10.3f}")
    print(f"{args.requests} requests x {args.prompts_per_request} prompts x {args.max_tokens} tokens: "
          f"{args.clients} clients at once = {result['speedup']:.2f}x the one-at-a-time throughput")


if __name__ == "__main__":
    main()
