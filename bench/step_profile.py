"""Where a GRPO step's time goes: one step under torch.profiler (GPU kernels per phase), one under cProfile (host).

Used by `bench.grpo_step --profile`: the last timed step but one runs under torch.profiler, the last
under cProfile, and a summary of each is printed and written next to the JSON report. The step's host
functions (HOST_FUNCTIONS) get named ranges, so that the GPU's idle stretches are attributed to them.
"""

from __future__ import annotations

import bisect
import cProfile
import functools
import importlib
import io
import pstats
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import TrainerCallback

PHASE_PREFIXES = ("train/", "eval/")
RANGE_PREFIX = "host:"
ATTRIBUTED_GAP_MS = 0.05  # idle stretches shorter than this are counted, not attributed
DECODE_KERNEL = "_decode_split_kernel"

# The host functions of a step that get a named range while profiling: (module, owner or None, attribute).
HOST_FUNCTIONS = [
    ("flywheel.trainer.online_trainer", None, "tokenize_prompts"),
    ("flywheel.trainer.online_trainer", None, "left_pad"),
    ("flywheel.trainer.online_trainer", None, "right_pad"),
    ("flywheel.trainer.online_trainer", "OnlineTrainer", "_log_lengths"),
    ("flywheel.trainer.online_trainer", "OnlineTrainer", "training_step"),
    ("flywheel.trainer.grpo_trainer", None, "split_batch"),
    ("flywheel.trainer.grpo_trainer", None, "completion_logps"),
    ("flywheel.trainer.grpo_trainer", "GRPOTrainer", "_generate_and_score"),
    ("flywheel.trainer.grpo_trainer", "GRPOTrainer", "_advantages"),
    ("flywheel.trainer.grpo_trainer", None, "grpo_loss"),
    ("flywheel.trainer.logprobs", None, "_prompt_groups"),
    ("flywheel.trainer.logprobs", None, "packed_completion_logits"),
    ("flywheel.trainer.prompt_packing", "PackedLayout", "build"),
    ("flywheel.trainer.rollout", "ColocateRollout", "generate"),
    ("flywheel.trainer.rollout", "ColocateRollout", "_push_weights"),
    ("flywheel.engine.llm", "LLM", "generate"),
    ("flywheel.engine.engine", "LLMEngine", "add_request"),
    ("flywheel.engine.engine", "LLMEngine", "step"),
    ("flywheel.engine.engine", "LLMEngine", "_launch_next_decode"),
    ("flywheel.engine.engine", "LLMEngine", "_append_tokens"),
    ("flywheel.engine.engine", "LLMEngine", "_request_output"),
    ("flywheel.engine.engine", "LLMEngine", "_fork"),
    ("flywheel.engine.scheduler", "Scheduler", "schedule"),
    ("flywheel.engine.model_runner", "ModelRunner", "prepare"),
    ("flywheel.engine.model_runner", "ModelRunner", "execute"),
    ("flywheel.engine.sampler", "Sampler", "__call__"),
    ("flywheel.engine.sampler", "Sampler", "draw_async"),
    ("flywheel.engine.sampler", "PendingDraw", "result"),
    ("accelerate.accelerator", "Accelerator", "backward"),
    ("accelerate.accelerator", "Accelerator", "clip_grad_norm_"),
    ("accelerate.optimizer", "AcceleratedOptimizer", "step"),
    ("transformers.trainer", "Trainer", "_maybe_log_save_evaluate"),
    ("transformers.trainer", "Trainer", "get_batch_samples"),
]


@functools.cache
def name_host_functions() -> None:
    """Wrap each of HOST_FUNCTIONS in a named range (once), so that a trace says what the host did while the
    GPU idled."""
    for module_name, owner_name, attribute in HOST_FUNCTIONS:
        owner = importlib.import_module(module_name)
        if owner_name is not None:
            owner = getattr(owner, owner_name)
        raw = owner.__dict__[attribute] if owner_name is not None else getattr(owner, attribute)
        wrap = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
        label = f"{RANGE_PREFIX}{owner_name or module_name.rsplit('.', 1)[-1]}.{attribute}"

        def ranged(*args, _original=wrap, _label=label, **kwargs):
            with record_function(_label):
                return _original(*args, **kwargs)

        ranged = functools.wraps(wrap)(ranged)
        setattr(owner, attribute, type(raw)(ranged) if isinstance(raw, (staticmethod, classmethod)) else ranged)


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
    # Named ranges have a copy on the GPU's timeline spanning their kernels and the idle time between them.
    kernels = [e for e in on_gpu if not e.is_user_annotation]
    phases = [e for e in on_gpu if e.is_user_annotation and e.name.startswith(PHASE_PREFIXES)]
    spans_all = sorted((k.time_range.start, k.time_range.end) for k in kernels)
    lines = [f"GPU busy {busy_ms(spans_all):.1f} ms in the step (kernels, copies and sets; "
             f"{sum(k.time_range.elapsed_us() for k in kernels) / 1e3:.1f} ms summed)", "    its longest idle stretches:"]
    for gap_start, gap_ms in _idle_stretches(spans_all)[:8]:
        lines.append(f"    {gap_ms:8.1f} ms idle from {(gap_start - spans_all[0][0]) / 1e3:.1f} ms into the step")
    spans = sorted((e.name, e.time_range.start, e.time_range.end) for e in phases)
    for name, start, end in sorted(spans, key=lambda span: span[1]):
        inside = [k for k in kernels if start <= k.time_range.start < end]
        lines.append(f"{name}: {(end - start) / 1e3:.1f} ms on the GPU's clock")
        lines += _largest(inside)
    outside = [k for k in kernels if not any(start <= k.time_range.start < end for _, start, end in spans)]
    ranges = [e for e in prof.events() if e.device_type != cuda and e.name.startswith(RANGE_PREFIX)]
    # The rollout ends with its results on the host, so its kernels have all ended when its range does.
    rollout_end = max((e.time_range.end for e in ranges if e.name.endswith("Rollout.generate")), default=None)
    if rollout_end is None:
        lines.append("outside the timed phases (training):")
        lines += _largest(outside, count=40)
    else:
        lines.append("outside the timed phases, during the rollout:")
        lines += _largest([k for k in outside if k.time_range.start < rollout_end], count=25)
        lines.append("outside the timed phases, after the rollout (training):")
        lines += _largest([k for k in outside if k.time_range.start >= rollout_end], count=100)
    if not ranges:
        return lines + idle_between_kernels(kernels)
    return lines + idle_attribution(_idle_stretches(spans_all), ranges)


def idle_between_kernels(kernels: list) -> list[str]:
    """Without host ranges (a device-only profile, whose host runs at its own speed): the GPU's idle time
    before, during and after the rollout's decode kernels, and the kernels around the longest stretches."""
    ordered = sorted(kernels, key=lambda k: k.time_range.start)
    starts = [k.time_range.start for k in ordered]
    decode = [i for i, k in enumerate(ordered) if k.name == DECODE_KERNEL]
    first, last = (decode[0], decode[-1]) if decode else (0, -1)
    # Each stretch as (index of the kernel that ends it, length in ms), longest first.
    gaps = [(bisect.bisect_right(starts, gap_start), ms)
            for gap_start, ms in _idle_stretches([(k.time_range.start, k.time_range.end) for k in ordered])]
    parts = {"before the first decode step": 0.0, "between decode steps": 0.0, "after the last decode step": 0.0}
    for i, ms in gaps:
        key = "before the first decode step" if i <= first else (
            "between decode steps" if i <= last else "after the last decode step")
        parts[key] += ms
    lines = ["GPU idle (device-only profile): " + ", ".join(f"{ms:.1f} ms {where}" for where, ms in parts.items())]
    lines.append("the longest idle stretches, between kernels:")
    origin = ordered[0].time_range.start
    for i, ms in gaps[:25]:
        lines.append(f"    {ms:7.2f} ms at {(ordered[i].time_range.start - origin) / 1e3:8.1f} ms: "
                     f"{ordered[i - 1].name[:50]} → {ordered[i].name[:50]}")
    return lines


def idle_attribution(gaps: list[tuple[float, float]], ranges: list) -> list[str]:
    """What the host was doing while the GPU idled: the idle time inside each named host range
    (nested ranges each count it), and the innermost ranges over each of the longest stretches."""
    total = sum(length for _, length in gaps)
    lines = [f"GPU idle {total:.1f} ms in the step; idle time inside each host range (ms, stretches of "
             f"{ATTRIBUTED_GAP_MS} ms or more):"]
    per_range: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for start, length in (gap for gap in gaps if gap[1] >= ATTRIBUTED_GAP_MS):
        end = start + length * 1e3
        for event in ranges:
            overlap = min(end, event.time_range.end) - max(start, event.time_range.start)
            if overlap > 0:
                per_range[event.name][0] += overlap / 1e3
                per_range[event.name][1] += 1
    for name, (ms, count) in sorted(per_range.items(), key=lambda item: -item[1][0])[:25]:
        lines.append(f"    {name[len(RANGE_PREFIX):]:<50} {ms:8.1f} ms {count:7d}")
    origin = min((e.time_range.start for e in ranges), default=0.0)
    lines.append("the longest idle stretches, with the innermost host ranges over them:")
    for start, length in gaps[:12]:
        middle = start + length * 500
        inside = sorted((e for e in ranges if e.time_range.start <= middle <= e.time_range.end),
                        key=lambda e: e.time_range.elapsed_us())
        names = " < ".join(e.name[len(RANGE_PREFIX):] for e in inside[:4]) or "(no named range)"
        lines.append(f"    {length:7.1f} ms at {(start - origin) / 1e3:8.1f} ms: {names}")
    return lines


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
        lines.append(f"    {name[:110]:<110} {calls:>6} {us / 1e3:>8.1f} ms")
    return lines


class StepProfiler(TrainerCallback):
    """Profiles optimizer step `torch_step` with torch.profiler and step `torch_step + 1` with cProfile."""

    def __init__(self, torch_step: int, out_prefix: Path, device_only: bool = False) -> None:
        self.torch_step = torch_step
        self.activities = [ProfilerActivity.CUDA] if device_only else [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        self.out_prefix = out_prefix
        self._profiler: profile | None = None
        self._host: cProfile.Profile | None = None
        self.summary: list[str] = []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.torch_step:
            torch.cuda.synchronize()
            self._profiler = profile(activities=self.activities)
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
