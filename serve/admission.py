"""Which waiting jobs start now: the server's batching policies and priority levels, as a
pure function of the queue (the batcher calls it under its lock, at every iteration); and
the checks of what a request asks of them (its level, its rows).

- ``step`` (continuous batching): every waiting job whose rows fit beside the active jobs
  of its size, up to ``max_rows`` a size.
- ``request`` (Triton's and PyTriton's dynamic batching): when nothing runs, the first
  waiting job and those identical to it (one pipeline batch), once the batch is full or
  the first has waited ``queue_delay``.
- ``single``: one job at a time.

Jobs are taken level by level (``Job.priority``: 1 the highest; 0 for all where the server
has no levels), in arrival order within a level. Under ``step``, a job that does not fit
keeps the rows of its size for its level: a lower level's job that would fit waits too (it
would hold the rows for all its steps), while one of the same level still goes ahead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from sdtrt.errors import InvalidInputError
from sdtrt.options import check_integer


class Waiting(Protocol):
    """What admission reads of a job (serve/jobs.py's Job)."""

    @property
    def size(self) -> tuple[int, int]: ...
    @property
    def rows(self) -> int: ...
    @property
    def same_batch_key(self) -> Any: ...

    priority: int
    submitted: float


J = TypeVar("J", bound=Waiting)


def admit(
    policy: str,
    waiting: Sequence[J],
    active: Sequence[J],
    max_rows: int,
    queue_delay: float,
    now: float,
) -> list[J]:
    """The waiting jobs to start now, in the order they start."""
    ranked = sorted(waiting, key=lambda job: job.priority)  # stable: arrival order in a level
    if policy == "step":
        return _continuous(ranked, active, max_rows)
    if active or not ranked:
        return []
    head = ranked[0]
    if policy == "single":
        return [head]
    same = [job for job in ranked if job.same_batch_key == head.same_batch_key]
    same = same[: max_rows // head.rows]
    full = len(same) * head.rows + head.rows > max_rows
    return same if full or now - head.submitted >= queue_delay else []


def _continuous(ranked: list[J], active: Sequence[J], max_rows: int) -> list[J]:
    rows: dict[tuple[int, int], int] = {}
    for job in active:
        rows[job.size] = rows.get(job.size, 0) + job.rows
    waits: dict[tuple[int, int], int] = {}  # a size's highest level left waiting for rows
    admitted = []
    for job in ranked:
        if waits.get(job.size, job.priority) < job.priority:
            continue  # its rows go to the higher level's job first
        if rows.get(job.size, 0) + job.rows <= max_rows:
            rows[job.size] = rows.get(job.size, 0) + job.rows
            admitted.append(job)
        else:
            waits.setdefault(job.size, job.priority)
    return admitted


def priority_level(priority: int, levels: int) -> int:
    """A request's priority (Triton's: 1 the highest) as its level among ``levels``: itself,
    or the lowest for 0 (the default)."""
    check_integer("priority", priority, 0)
    if priority > levels:
        if levels == 0:
            raise InvalidInputError(
                f"priority {priority}: this server has no priority levels (sdtrt serve "
                "--priority-levels N); send 0 or none"
            )
        raise InvalidInputError(
            f"priority must be in [0, {levels}] (1 the highest; 0: the default, "
            f"{levels}), got {priority}"
        )
    return priority or levels


def check_rows(images: int, guidance_scale: float, max_rows: int) -> None:
    """A request's rows of a step fit in one UNet call of ``max_rows``."""
    per_image = 2 if guidance_scale > 1.0 else 1
    if images * per_image > max_rows:
        raise InvalidInputError(
            f"{images} images take {images * per_image} UNet rows a step ({per_image} "
            f"each at this guidance); this server's calls take {max_rows}: at most "
            f"{max_rows // per_image} images per request"
        )
