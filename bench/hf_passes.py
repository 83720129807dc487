"""transformers `generate` on a workload, pass after pass: how much its first full-length pass costs.

    python3 -m bench.hf_passes --workload rollout --shape qwen2.5-0.5b --passes 3

After a 4-token warm-up (as bench.throughput does), runs the whole workload --passes times and
prints each pass's time, tokens/s, and the `cudaMalloc` calls the caching allocator made in it.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

from bench.shapes import WORKLOADS, model_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=list(WORKLOADS), default="rollout")
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    workload = WORKLOADS[args.workload]
    requests = workload.requests(model_config(args.shape).vocab_size)
    if len({len(p) for p, _ in requests}) != 1 or len({t for _, t in requests}) != 1:
        raise SystemExit("this check needs equal prompt and completion lengths")
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(model_config(args.shape), dtype=torch.bfloat16).eval()
    prompts = torch.tensor([p for p, _ in requests], device="cuda")
    new_tokens = requests[0][1]

    @torch.no_grad()
    def one_pass(tokens: int) -> None:
        model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                       temperature=workload.temperature, top_p=1.0, top_k=0, max_new_tokens=tokens,
                       min_new_tokens=tokens, num_return_sequences=workload.n, pad_token_id=0)

    one_pass(4)
    total = len(requests) * workload.n * new_tokens
    for index in range(args.passes):
        mallocs = torch.cuda.memory_stats()["num_device_alloc"]
        torch.cuda.synchronize()
        started = time.perf_counter()
        one_pass(new_tokens)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        mallocs = torch.cuda.memory_stats()["num_device_alloc"] - mallocs
        print(f"pass {index}: {seconds:.2f} s, {total / seconds:,.0f} tok/s, {mallocs} cudaMalloc calls")


if __name__ == "__main__":
    main()
