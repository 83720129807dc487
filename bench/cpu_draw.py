"""The CPU sampler's draw against `torch.multinomial`, for a decode step's probabilities.

    python -m bench.cpu_draw [--rows 128] [--vocab 512 151936]

All draw one token per row from the same softmax probabilities [rows, vocab] (float32, CPU):
`multinomial` is PyTorch's own sampler and the baseline; `race` is the exponential race (argmax of
p / E, E ~ Exp(1), one uniform per token), the GPU kernel's method and the CPU sampler's before.
Prints the best of 5 rounds per call, in ms, and the ratio to the baseline; a table last.
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from flywheel.engine.sampler import Sampler


def best_ms(draw, rounds: int = 5, calls: int = 10) -> float:
    draw()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            draw()
        times.append((time.perf_counter() - started) / calls * 1e3)
    return min(times)


def exponential_race(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.empty(probs.shape).uniform_(generator=generator).neg_().log1p_().neg_()
    return (probs / noise).argmax(dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--vocab", type=int, nargs="+", default=[512, 151936])
    parser.add_argument("--out", default="cpu_draw.json")
    args = parser.parse_args()
    rows = []
    for vocab in args.vocab:
        probs = torch.softmax(torch.randn(args.rows, vocab, generator=torch.Generator().manual_seed(0)) * 3, dim=-1)
        sampler = Sampler(vocab, torch.device("cpu"), 0)
        seqs = [SimpleNamespace(seed=None, generator=None) for _ in range(args.rows)]
        engine = best_ms(lambda: sampler._inverse_cdf_draw(probs, seqs))
        baseline = best_ms(lambda: torch.multinomial(probs, 1))
        race = best_ms(lambda: exponential_race(probs, sampler.generator))
        rows.append({"rows": args.rows, "vocab": vocab, "engine_ms": engine, "multinomial_ms": baseline,
                     "race_ms": race, "ratio": baseline / engine})
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    print(f"{'rows':>5} {'vocab':>8} {'engine ms':>10} {'multinomial ms':>15} {'race ms':>8} {'ratio':>6}")
    for row in rows:
        print(f"{row['rows']:>5} {row['vocab']:>8} {row['engine_ms']:>10.3f} {row['multinomial_ms']:>15.3f} "
              f"{row['race_ms']:>8.3f} {row['ratio']:>6.1f}")


if __name__ == "__main__":
    main()
