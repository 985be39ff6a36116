"""``POST /v1/img2img/stream``: the request of ``/v1/img2img``, answered as server-sent events
(``text/event-stream``) while its job runs, for a client that shows progress:

    event: queued     data: {}                         the request is checked and queued
    event: step       data: {"step": 3, "steps": 12}   after each of its UNet steps
    event: result     data: {...}                      /v1's JSON answer (PNGs in base64)
    event: error      data: {"error": "...", "status": 500}   a failure after it was queued

A request refused before it is queued (a bad field, a full queue, no API key) is answered
as ``/v1/img2img`` answers it: its status and ``{"error": message}``, no stream. A client
that goes away mid-stream cancels its job. A step is counted when the worker has queued it
for the device, which on a GPU runs up to two steps behind.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from sdtrt.serve.handling import BadRequest, off_loop
from sdtrt.serve.jobs import JobResult


class Progress:
    """A job's progress as the batcher's worker tells it (from its thread), for the event
    loop's stream: (steps done, steps), the steps None when the job is queued."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, int | None]] = asyncio.Queue()

    def __call__(self, done: int, steps: int | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (done, steps))
        except RuntimeError:  # the loop is closed: nobody is listening
            pass


def event(name: str, data: dict[str, Any]) -> bytes:
    """One server-sent event."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def queued(task: asyncio.Task[Any], progress: Progress) -> bool:
    """Waits until the job is queued (True) or the task has ended before that (False: its
    refusal is answered without a stream)."""
    getter = asyncio.ensure_future(progress.events.get())
    done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    if getter in done:
        progress.events.put_nowait(getter.result())  # the stream says it first
        return True
    getter.cancel()
    return False


async def events(
    task: asyncio.Task[tuple[JobResult, Any]],
    progress: Progress,
    answer: Callable[[JobResult], dict[str, Any]],
    ended: Callable[[int, JobResult | None], None],
) -> AsyncIterator[bytes]:
    """The stream of a queued job: its progress, then its result (``answer(result)``, built
    off the loop) or its error. ``ended(status, result)`` is told how it ended (499: the
    client went away, which cancels the job)."""
    status, result = 499, None
    try:
        while True:
            getter = asyncio.ensure_future(progress.events.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            yield _progress_event(*getter.result())
        while not progress.events.empty():  # told before the task ended
            yield _progress_event(*progress.events.get_nowait())
        try:
            result, _ = task.result()
            body = await off_loop(None, answer, result)
            status = 200
            yield event("result", body)
        except BadRequest as exc:
            status = exc.status
            yield event("error", {"error": exc.message, "status": exc.status})
        except Exception as exc:  # unforeseen: still this request's failure alone
            status = 500
            yield event("error", {"error": f"{type(exc).__name__}: {exc}", "status": 500})
    finally:
        if not task.done():  # the client went away mid-stream
            task.cancel()  # run_job cancels the job
        elif not task.cancelled():
            task.exception()  # read (run_job may have seen the client go first): not logged
        ended(status, result)


def _progress_event(done: int, steps: int | None) -> bytes:
    if steps is None:
        return event("queued", {})
    return event("step", {"step": done, "steps": steps})
