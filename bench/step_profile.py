"""Where a GRPO step's time goes: one step under torch.profiler (GPU kernels per phase), one under cProfile (host).

Used by `bench.grpo_step --profile`: the last timed step but one runs under torch.profiler, the last
under cProfile, and a summary of each is printed and written next to the JSON report.
"""

from __future__ import annotations

import cProfile
import io
import pstats
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback



PHASE_PREFIXES = ("train/", "eval/")


def busy_ms(spans: list[tuple[float, float]]) -> float:
    """Time covered by at least one of the (start, end) spans, in µs → ms."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy / 1e3


def device_summary(prof: profile) -> list[str]:
    """The GPU's busy time over the step and within each phase's span on the GPU, with its largest kernels."""
    cuda = torch.autograd.DeviceType.CUDA
    on_gpu = [e for e in prof.events() if e.device_type == cuda]
    kernels = [e for e in on_gpu if not e.name.startswith(PHASE_PREFIXES)]
    phases = [e for e in on_gpu if e.name.startswith(PHASE_PREFIXES)]
    spans_all = sorted((k.time_range.start, k.time_range.end) for k in kernels)
    lines = [f"GPU busy {busy_ms(spans_all):.1f} ms in the step", "    its longest idle stretches:"]
    for gap_start, gap_ms in _idle_stretches(spans_all)[:8]:
        lines.append(f"    {gap_ms:8.1f} ms idle from {(gap_start - spans_all[0][0]) / 1e3:.1f} ms into the step")
    spans = sorted((e.name, e.time_range.start, e.time_range.end) for e in phases)
    for name, start, end in sorted(spans, key=lambda span: span[1]):
        inside = [k for k in kernels if start <= k.time_range.start < end]
        lines.append(f"{name}: {(end - start) / 1e3:.1f} ms on the GPU's clock")
        lines += _largest(inside)
    outside = [k for k in kernels if not any(start <= k.time_range.start < end for _, start, end in spans)]
    lines.append("outside the timed phases (training):")
    return lines + _largest(outside)


def _idle_stretches(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(start, length in ms) of the GPU's idle stretches between sorted kernel spans, longest first."""
    gaps, reach = [], spans[0][1] if spans else 0.0
    for start, end in spans[1:]:
        if start > reach:
            gaps.append((reach, (start - reach) / 1e3))
        reach = max(reach, end)
    return sorted(gaps, key=lambda gap: -gap[1])


def _largest(kernels: list, count: int = 15) -> list[str]:
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for kernel in kernels:
        totals[kernel.name][0] += 1
        totals[kernel.name][1] += kernel.time_range.elapsed_us()
    lines = [f"    {busy_ms([(k.time_range.start, k.time_range.end) for k in kernels]):.1f} ms busy, "
             f"{len(kernels)} kernels"]
    for name, (calls, us) in sorted(totals.items(), key=lambda item: -item[1][1])[:count]:
        lines.append(f"    {name[:70]:<70} {calls:>6} {us / 1e3:>8.1f} ms")
    return lines


class StepProfiler(TrainerCallback):
    """Profiles optimizer step `torch_step` with torch.profiler and step `torch_step + 1` with cProfile."""

    def __init__(self, torch_step: int, out_prefix: Path) -> None:
        self.torch_step = torch_step
        self.out_prefix = out_prefix
        self._profiler: profile | None = None
        self._host: cProfile.Profile | None = None
        self.summary: list[str] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.torch_step:
            torch.cuda.synchronize()
            self._profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self._profiler.__enter__()
        elif state.global_step == self.torch_step + 1:
            self._host = cProfile.Profile()
            self._host.enable()

    def on_step_end(self, args, state, control, **kwargs):
        if self._profiler is not None:
            torch.cuda.synchronize()
            self._profiler.__exit__(None, None, None)
            self._summarize_device(self._profiler)
            self._profiler = None
        elif self._host is not None:
            self._host.disable()
            self._summarize_host(self._host)
            self._host = None

    def _summarize_device(self, prof: profile) -> None:
        self._emit("device", device_summary(prof))

    def _summarize_host(self, host: cProfile.Profile) -> None:
        text = io.StringIO()
        pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(30)
        self._emit("host", text.getvalue().splitlines())

    def _emit(self, kind: str, lines: list[str]) -> None:
        Path(f"{self.out_prefix}.{kind}.txt").write_text("\n".join(lines) + "\n")
        self.summary += lines
