"""Clocks for benchmarks: every read follows a device synchronisation."""

from __future__ import annotations

import functools
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdtrt.runtime.clock import mark, span_totals


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class StageTimer:
    """Wraps callables so that each call's time is added to a named stage.

    On a GPU each call is timed with CUDA events on the current stream, not by waiting for
    the GPU around it: the host keeps queueing ahead as it does untimed, so that a row whose
    UNet is a call of its own pays no more synchronisation than a row whose UNet runs inside
    a step graph. ``settle`` (after a run's final synchronisation) adds the events' times.
    On the CPU, calls are synchronous: wall time (``sdtrt.runtime.clock.mark``).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.enabled = True
        """False: wrapped calls run as they are (no clock, no event)."""
        self._pending: list[tuple[str, Any, Any]] = []

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()
        self._pending.clear()

    def settle(self) -> None:
        """Wait for the device once and add the recorded calls' times to their stages."""
        if self._pending:
            synchronize(self.device)
            for stage, ms in span_totals(self._pending).items():
                self.totals[stage] += ms
            self._pending.clear()

    def wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.enabled:
                return fn(*args, **kwargs)
            self.calls[stage] += 1
            start = mark(self.device)
            out = fn(*args, **kwargs)
            self._pending.append((stage, start, mark(self.device)))
            return out

        return timed


def alternate(
    runs: dict[str, Callable[[], Any]], repeats: int
) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """Call each of ``runs`` in turn, round after round, a warm-up round first, then
    ``repeats`` timed ones (an A/B in one process: a drift of the machine reaches every run
    alike). Per run, the median ms of the whole call ("total") and, for img2img calls
    (outputs with ``timings_ms``), of each stage; and its last output. The outputs are on
    the host, so a call's wall time includes its device work."""
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    last: dict[str, Any] = {}
    for repeat in range(repeats + 1):
        for name, run in runs.items():
            begun = time.perf_counter()
            last[name] = run()
            total_ms = (time.perf_counter() - begun) * 1000
            if repeat:
                stages = getattr(last[name], "timings_ms", {})
                samples[name].append({**stages, "total": total_ms})
    medians = {
        name: {stage: statistics.median(s[stage] for s in taken) for stage in taken[0]}
        for name, taken in samples.items()
    }
    return medians, last


def percentiles(samples: list[float]) -> dict[str, Any]:
    a = np.asarray(samples, dtype=np.float64)
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "samples": [round(float(x), 3) for x in a],
    }


def reset_peak_memory() -> None:
    """Peak RSS (Linux: writing 5 to clear_refs resets VmHWM) and peak CUDA memory."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
