"""Metrics the online trainers log: values averaged over a logging window, phase times per optimizer step."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.profiler import record_function

PHASES = ("generation", "reward", "train", "weight_sync")


class MetricsLog:
    """Collects named values between two logs, per mode ('train' or 'eval').

    Values are averaged at log time (NaN values are skipped); phase times are summed and divided by
    the optimizer steps since the last log, so `time/<phase>` reads as seconds per step.
    """

    def __init__(self) -> None:
        self._values: dict[str, dict[str, list[float | torch.Tensor]]] = {
            "train": defaultdict(list), "eval": defaultdict(list)}
        self._seconds: dict[str, dict[str, float]] = {"train": defaultdict(float), "eval": defaultdict(float)}

    def add(self, mode: str, name: str, value: float | torch.Tensor) -> None:
        """Record a value; a one-element tensor stays on its device until the log reads it, so
        recording never waits for the GPU."""
        self._values[mode][name].append(value.detach() if isinstance(value, torch.Tensor) else float(value))

    def set(self, mode: str, name: str, value: float) -> None:
        """Record a value that replaces the window's others (a running total)."""
        self._values[mode][name] = [float(value)]

    def add_time(self, mode: str, phase: str, seconds: float) -> None:
        self._seconds[mode][phase] += seconds

    def seconds(self, mode: str) -> float:
        """Total seconds recorded so far in this window (all phases)."""
        return sum(self._seconds[mode].values())

    @contextmanager
    def timed(self, mode: str, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            with record_function(f"{mode}/{phase}"):  # a named range in profiler traces
                yield
        finally:
            self.add_time(mode, phase, time.perf_counter() - start)

    def summary(self, mode: str, num_steps: int) -> dict[str, float]:
        """The window's averages and per-step times; starts a new window."""
        logs = {}
        on_device = [v for values in self._values[mode].values() for v in values if isinstance(v, torch.Tensor)]
        read = iter(torch.stack([v.float().reshape(()) for v in on_device]).tolist() if on_device else [])
        for name, values in self._values[mode].items():
            values = [next(read) if isinstance(v, torch.Tensor) else v for v in values]
            finite = [v for v in values if not math.isnan(v)]
            logs[name] = sum(finite) / len(finite) if finite else float("nan")
        if self._seconds[mode]:
            for phase in PHASES:
                logs[f"time/{phase}"] = self._seconds[mode].get(phase, 0.0) / max(num_steps, 1)
        self._values[mode].clear()
        self._seconds[mode].clear()
        return logs
