"""The trainer's text work around a rollout against transformers' own calls, on the host.

    python -m bench.rollout_text [--prompts 64] [--num-generations 8] [--prompt-length 128] \
        [--completion-length 256]

A GRPO step tokenizes its prompts (each repeated `num_generations` times, consecutively, as the
repeat sampler hands them over), decodes every completion for the reward functions and pads the
completions' ids and logprobs into tensors, while the GPU waits. `tokenize_prompts` and
`decode_completions` are timed against the baseline of calling the tokenizer on every row and
`tokenizer.batch_decode`, for plain and chat prompts; `right_pad` against a tensor per row padded by
`pad_sequence` (as TRL pads). Byte-level tokenizer, random text. Prints the median of 9 rounds in ms
and the ratio; a table last.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch
from torch.nn.utils.rnn import pad_sequence

from flywheel.testing import byte_tokenizer
from flywheel.trainer.batching import right_pad
from flywheel.trainer.prompts import decode_completions, prompt_text, tokenize_prompts


def median_ms(call, rounds: int = 9) -> float:
    call()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--completion-length", type=int, default=256)
    parser.add_argument("--out", default="rollout_text.json")
    args = parser.parse_args()

    tokenizer = byte_tokenizer()
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(args.prompt_length))
             for _ in range(args.prompts)]
    plain = [text for text in texts for _ in range(args.num_generations)]
    chat = [[{"role": "user", "content": text}] for text in plain]
    rows = len(plain)
    completion_ids = [[rng.randrange(256) for _ in range(args.completion_length)] for _ in range(rows)]
    logprobs = [[-rng.random() for _ in range(args.completion_length)] for _ in range(rows)]

    def pad_per_row():
        return [pad_sequence([torch.tensor(row, dtype=dtype) for row in values], batch_first=True)
                for values, dtype in ((completion_ids, torch.long), (logprobs, torch.float32))]

    def tokenize_every_row(prompts):
        return tokenizer([prompt_text(prompt, tokenizer) for prompt in prompts], add_special_tokens=False)

    cases = {
        "tokenize plain prompts": (lambda: tokenize_every_row(plain), lambda: tokenize_prompts(plain, tokenizer, None)),
        "tokenize chat prompts": (lambda: tokenize_every_row(chat), lambda: tokenize_prompts(chat, tokenizer, None)),
        "decode completions": (lambda: tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
                               lambda: decode_completions(plain, completion_ids, tokenizer)),
        "pad ids and logprobs": (pad_per_row, lambda: (right_pad(completion_ids, 0, "cpu"),
                                                       right_pad(logprobs, 0.0, "cpu", dtype=torch.float32))),
    }
    results = []
    for name, (baseline, ours) in cases.items():
        baseline_ms, ours_ms = median_ms(baseline), median_ms(ours)
        results.append({"case": name, "baseline_ms": baseline_ms, "flywheel_ms": ours_ms,
                        "ratio": baseline_ms / ours_ms})
    with open(args.out, "w") as handle:
        json.dump({"rows": rows, "prompt_length": args.prompt_length,
                   "completion_length": args.completion_length, "results": results}, handle, indent=2)
    print(f"\n{args.prompts} prompts × {args.num_generations}, {args.prompt_length} → {args.completion_length} "
          f"tokens, byte-level tokenizer (median of 9, ms)")
    print(f"{'case':<24} {'baseline':>13} {'flywheel':>9} {'ratio':>7}")
    for r in results:
        print(f"{r['case']:<24} {r['baseline_ms']:>13.2f} {r['flywheel_ms']:>9.2f} {r['ratio']:>6.1f}x")


if __name__ == "__main__":
    main()
