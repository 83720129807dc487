"""Metrics the online trainers log: values averaged over a logging window, phase times per optimizer step."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = ("generation", "reward", "train", "weight_sync")


class MetricsLog:
    """Collects named values between two logs, per mode ('train' or 'eval').

    Values are averaged at log time (NaN values are skipped); phase times are summed and divided by
    the optimizer steps since the last log, so `time/<phase>` reads as seconds per step.
    """

    def __init__(self) -> None:
        self._values: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._seconds: dict[str, dict[str, float]] = {"train": defaultdict(float), "eval": defaultdict(float)}

    def add(self, mode: str, name: str, value: float) -> None:
        self._values[mode][name].append(float(value))

    def add_time(self, mode: str, phase: str, seconds: float) -> None:
        self._seconds[mode][phase] += seconds

    def seconds(self, mode: str) -> float:
        """Total seconds recorded so far in this window (all phases)."""
        return sum(self._seconds[mode].values())

    @contextmanager
    def timed(self, mode: str, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add_time(mode, phase, time.perf_counter() - start)

    def summary(self, mode: str, num_steps: int) -> dict[str, float]:
        """The window's averages and per-step times; starts a new window."""
        logs = {}
        for name, values in self._values[mode].items():
            finite = [v for v in values if not math.isnan(v)]
            logs[name] = sum(finite) / len(finite) if finite else float("nan")
        if self._seconds[mode]:
            for phase in PHASES:
                logs[f"time/{phase}"] = self._seconds[mode].get(phase, 0.0) / max(num_steps, 1)
        self._values[mode].clear()
        self._seconds[mode].clear()
        return logs
