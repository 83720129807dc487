"""The host's share of a GPU decode step, measured on any machine: the rollout workload's bookkeeping
with the model and the draw replaced by stand-ins.

    python -m bench.host_step [--no-logprobs]

Everything the engine does per step on the host for the overlapped GPU decode (scheduling, block
tables, step inputs, appending tokens and logprobs, stop checks) runs for real on a tiny model's
engine; the forward pass returns nothing and the draw returns random tokens, so no CUDA call is
timed. The rollout workload (64 prompts × n=8, 128 → 256 tokens) runs to the end through
`LLM.generate`, as the colocated trainer calls it; prints the host time per decode step and the host
time at the rollout's edges (before the prefill is launched, from it to the first decode step, from
the last one to the outputs), best of 3.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from flywheel import LLM, SamplingParams
from flywheel.engine import sampler as sampler_module
from flywheel.testing import write_tiny_checkpoint


class _Drawn:
    """A draw that is already on the host, standing in for `PendingDraw`."""

    def __init__(self, drawn: torch.Tensor) -> None:
        self.token_ids, self.drawn = drawn[0].long(), drawn

    def result(self):
        return sampler_module._draw_output(self.drawn)


def stub_device_work(llm: LLM) -> list[float]:
    """Replace the forward pass and the draw; returns the list that gets the time of each forward launch."""
    engine = llm.engine
    vocab = engine.hf_config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def draw(logits, temperature, step_seed, row_seeds=None, with_ranks=False):
        rows = logits.shape[0]
        out = torch.empty((3 if with_ranks else 2, rows), dtype=torch.float64)
        out[0] = torch.randint(0, vocab, (rows,), generator=generator).double()
        out[1] = -torch.rand(rows, generator=generator).double()
        if with_ranks:
            out[2] = torch.randint(1, 100, (rows,), generator=generator).double()
        return out

    sampler = engine.sampler
    sampler.draw_tokens = draw
    sampler.draw_async = lambda logits, seqs: _Drawn(sampler._draw(logits, seqs, sampler._batch_sampling(seqs)))
    engine.overlap_decode = True
    engine.runner.backend = None  # the GPU's inputs: no CPU shared-prefix layout
    launches = []

    def execute(inputs):
        launches.append(time.perf_counter())
        # One row of logits per sequence: a prefill's come from its logits indices.
        rows = inputs.input_ids if inputs.logits_indices is None else inputs.logits_indices
        return torch.empty(len(rows), 1)

    engine.ranks.execute = execute
    return launches


def run_workload(llm: LLM, params: SamplingParams, rng: random.Random, launches: list[float]) -> dict[str, float]:
    """One rollout; its host seconds per decode step and at its edges."""
    prompts = [[rng.randrange(256) for _ in range(128)] for _ in range(64)]
    launches.clear()
    start = time.perf_counter()
    llm.generate(prompts, params)
    end = time.perf_counter()
    llm.reset_prefix_cache()
    prefill, first_decode, last_decode = launches[0], launches[1], launches[-1]
    return {"decode step": (last_decode - first_decode) / (len(launches) - 2), "before the prefill": prefill - start,
            "prefill to first decode": first_decode - prefill, "last decode to outputs": end - last_decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-logprobs", action="store_true", help="sample without logprobs=0")
    parser.add_argument("--eos", action="store_true",
                        help="stop at EOS, which the random draw hits once in ~260 tokens: rows leave the batch "
                             "every step or two, as in a trained policy's rollout")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flywheel-host-step-") as tmp:
        llm = LLM(str(write_tiny_checkpoint(Path(tmp) / "model", "qwen2", seed=0)), kv_cache_memory_gb=1.0,
                  max_num_seqs=512, max_model_len=512)
        launches = stub_device_work(llm)
        params = SamplingParams(n=8, max_tokens=256, ignore_eos=not options.eos, detokenize=False,
                                logprobs=None if options.no_logprobs else 0)
        rng = random.Random(0)
        run_workload(llm, params, rng, launches)  # warm-up
        timings = [run_workload(llm, params, rng, launches) for _ in range(3)]
    best = {phase: min(timing[phase] for timing in timings) for phase in timings[0]}
    print(f"host per decode step: {best.pop('decode step') * 1e3:.3f} ms (512 rows, best of 3, "
          f"logprobs={'none' if options.no_logprobs else 0}{', EOS' if options.eos else ''}); "
          + ", ".join(f"{phase} {seconds * 1e3:.1f} ms" for phase, seconds in best.items()))


if __name__ == "__main__":
    main()
