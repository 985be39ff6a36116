"""sdtrt's clocks. ``stopwatch``: wall time between two device synchronisations, so that
queued GPU work is inside the interval it belongs to (gpt-fast's rule: sync before every
clock read). ``mark``: a point in the device's queue, for timing work without waiting for
it (CUDA events): read the marks after one synchronisation."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


class Stopwatch:
    ms: float = 0.0
    """Milliseconds between the synchronised start and end (set when the block ends)."""


@contextmanager
def stopwatch(synchronize: Callable[[], None]) -> Iterator[Stopwatch]:
    """``with stopwatch(sync) as watch: ...`` then ``watch.ms``."""
    watch = Stopwatch()
    synchronize()
    start = time.perf_counter()
    yield watch
    synchronize()
    watch.ms = (time.perf_counter() - start) * 1e3


def mark(device: torch.device) -> Any:
    """A point in ``device``'s queue: a CUDA event recorded on the current stream; elsewhere
    (calls are synchronous) the wall time now. ``elapsed_ms`` reads two of them."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def elapsed_ms(start: Any, end: Any) -> float:
    """Milliseconds between two marks; on a GPU, once the device has passed ``end`` (after a
    synchronisation, or ``wait(end)``)."""
    if isinstance(start, float):
        return (end - start) * 1e3
    return float(start.elapsed_time(end))


def wait(point: Any) -> None:
    """Block until the device has passed the mark (on the CPU it already has)."""
    if not isinstance(point, float):
        point.synchronize()


def span_totals(spans: Iterable[tuple[str, Any, Any]]) -> dict[str, float]:
    """Milliseconds per stage, summed over (stage, start mark, end mark) spans; read once
    the device has passed their end marks."""
    totals: dict[str, float] = {}
    for stage, start, end in spans:
        totals[stage] = totals.get(stage, 0.0) + elapsed_ms(start, end)
    return totals
