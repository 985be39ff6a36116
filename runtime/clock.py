"""The one clock of sdtrt's timings: wall time between two device synchronisations, so that
queued GPU work is inside the interval it belongs to (gpt-fast's rule: sync before every
clock read)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


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
