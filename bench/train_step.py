"""Where a GRPO training micro-step's time goes: the model's forward, the completion logprobs, the backward.

    python3 -m bench.train_step --model-shape qwen2.5-0.5b --micro-batch 32 --out $OUT/train_step.json

One micro-batch of `--micro-batch` sequences (prompt + completion tokens, random ids) through the
policy as `GRPOTrainer.compute_loss` runs it (bf16 weights, `completion_logps` with entropy), timed
on the GPU: the forward alone to the last hidden state, the forward with the completion logprobs, and
forward + backward; the optimizer step (AdamW) apart. Each micro-batch runs twice: with every prompt
distinct, and in groups of `--num-generations` rows with one prompt, as a GRPO micro-batch holds them,
packed behind one copy of it (`prompt_packing`, as the trainers run them with `pack_prompts=True`;
`--no-pack` runs the groups as distinct rows). `--compile` times a `torch.compile`d model. Each
measurement is printed as it ends (a first call's time includes any compile); a table last, and JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from transformers import AutoModelForCausalLM

from bench.shapes import SHAPES, model_config
from flywheel.trainer.logprobs import completion_logps
from flywheel.trainer.prompt_packing import enable_packed_prompts


def mean_ms(step: Callable[[], None], repeats: int) -> float:
    started = time.perf_counter()
    step()  # warm-up (compiles, where anything does)
    torch.cuda.synchronize()
    print(f"  {step.__name__}: first call {time.perf_counter() - started:.1f} s", flush=True)
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000 / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--completion-length", type=int, default=256)
    parser.add_argument("--completions", type=int, default=512, help="completions per optimizer step")
    parser.add_argument("--num-generations", type=int, default=8, help="rows per prompt in the grouped runs")
    parser.add_argument("--compile", action="store_true", help="time a torch.compile'd model")
    parser.add_argument("--no-pack", action="store_true", help="groups run as distinct rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = model_config(args.model_shape)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).train()
    if not args.no_pack:
        enable_packed_prompts(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    policy = torch.compile(model) if args.compile else model
    results = []
    for rows, group in [(rows, group) for rows in args.micro_batch for group in (1, args.num_generations)]:
        prompt = torch.randint(0, config.vocab_size, (rows // group, args.prompt_length), device="cuda")
        prompt = prompt.repeat_interleave(group, dim=0)
        completion = torch.randint(0, config.vocab_size, (rows, args.completion_length), device="cuda")
        masks = torch.ones_like(prompt), torch.ones_like(completion)

        def forward_only() -> None:
            with torch.no_grad():
                model.model(input_ids=torch.cat([prompt, completion], 1), attention_mask=torch.cat(masks, 1))

        def forward_logps() -> None:
            with torch.no_grad():
                completion_logps(policy, prompt, masks[0], completion, masks[1], with_entropy=True)

        def forward_backward() -> None:
            logps, _ = completion_logps(policy, prompt, masks[0], completion, masks[1], with_entropy=True)
            logps.mean().backward()

        result = {"micro_batch": rows, "rows_per_prompt": group, "forward_ms": mean_ms(forward_only, args.repeats),
                  "forward_logps_ms": mean_ms(forward_logps, args.repeats),
                  "forward_backward_ms": mean_ms(forward_backward, args.repeats)}
        result["train_s_per_step"] = result["forward_backward_ms"] * args.completions / rows / 1000
        print(result, flush=True)
        results.append(result)
    optimizer_ms = mean_ms(optimizer.step, args.repeats)
    report = {"model_shape": args.model_shape, "gpu": torch.cuda.get_device_name(0), "compiled": args.compile,
              "packed": not args.no_pack,
              "prompt_length": args.prompt_length,
              "completion_length": args.completion_length, "optimizer_step_ms": optimizer_ms, "results": results}
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=2)
    print(f"\n{args.model_shape}, {args.prompt_length} + {args.completion_length} tokens per sequence; "
          f"AdamW step {optimizer_ms:.1f} ms{', compiled' if args.compile else ''}"
          f"{', groups as distinct rows' if args.no_pack else ', groups packed'}")
    print(f"{'micro-batch':>11} {'per prompt':>11} {'forward ms':>11} {'+ logprobs':>11} {'+ backward':>11} "
          f"{'s per step':>11}")
    for r in results:
        print(f"{r['micro_batch']:>11} {r['rows_per_prompt']:>11} {r['forward_ms']:>11.1f} {r['forward_logps_ms']:>11.1f} "
              f"{r['forward_backward_ms']:>11.1f} {r['train_s_per_step']:>11.2f}")


if __name__ == "__main__":
    main()
