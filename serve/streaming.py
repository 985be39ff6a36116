"""``POST /v1/img2img/stream``: the request of ``/v1/img2img``, answered as server-sent events
(``text/event-stream``) while its job runs, for a client that shows progress:

    event: queued     data: {}                         the request is checked and queued
    event: step       data: {"step": 3, "steps": 12}   after each of its UNet steps
    event: preview    data: {"step": 4, "steps": 12, "images": [...]}   with preview_every
    event: result     data: {...}                      /v1's JSON answer (PNGs in base64)
    event: error      data: {"error": "...", "status": 500}   a failure after it was queued

A preview is each image as the step estimates it finished (the scheduler's x0, decoded by
the model's VAE), a JPEG in base64, after every ``preview_every``-th step but the last.

A request refused before it is queued (a bad field, a full queue, no API key) is answered
as ``/v1/img2img`` answers it: its status and ``{"error": message}``, no stream. A client
that goes away mid-stream cancels its job. A step is counted when the worker has queued it
for the device, which on a GPU runs up to two steps behind; a preview comes once the device
is through its step (on a GPU, after the next step's event).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import PIL.Image

from sdtrt.serve.handling import (
    BadRequest,
    as_bad_request,
    encoded_images,
    field_value,
    json_answer,
    off_loop,
)
from sdtrt.serve.jobs import JobResult

Told = tuple[int, int | None, list[PIL.Image.Image] | None]
"""(steps done, steps, previews): the steps None when the job is queued, the previews None
but after a step asked to preview."""


class Progress:
    """A job's progress as the batcher's worker tells it (from its thread), for the event
    loop's stream (``Told``)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Told] = asyncio.Queue()

    def __call__(
        self, done: int, steps: int | None, previews: list[PIL.Image.Image] | None = None
    ) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (done, steps, previews))
        except RuntimeError:  # the loop is closed: nobody is listening
            pass


class Events:
    """How a protocol writes a stream's events; this one is /v1/img2img/stream's (above)."""

    def told(self, done: int, steps: int | None, previews: list[PIL.Image.Image] | None) -> bytes:
        """The events of one thing the worker told, b"" for none (run off the loop where it
        has previews: they are encoded)."""
        if steps is None:
            return event("queued", {})
        if previews is None:
            return event("step", {"step": done, "steps": steps})
        files = [base64.b64encode(file).decode() for file in encoded_images(previews, "jpeg")]
        return event("preview", {"step": done, "steps": steps, "images": files})

    def result(self, result: JobResult) -> bytes:
        """The events of the job's result (run off the loop: images are encoded)."""
        return event("result", json_answer(result))

    def error(self, failure: BadRequest) -> bytes:
        return event("error", {"error": failure.message, "status": failure.status})


def preview_every(value: Any, streamed: bool, where: str) -> int:
    """A request's ``preview_every``, checked: an integer >= 0 (0: none), above 0 only where
    the answer is ``streamed`` (``where`` says where previews come); BadRequest(422)."""
    every = field_value(value, int, "preview_every") or 0
    if every < 0 or (every and not streamed):
        raise BadRequest(
            422, f"preview_every must be an integer >= 0 (0: none), and previews come {where}; "
            f"got {every}"
        )  # fmt: skip
    return every


def every_nth(every: int) -> Callable[[int], frozenset[int]]:
    """The steps a job of ``steps`` previews after, for ``preview_every``: every ``every``-th
    one but the last (the result shows it); none for 0."""
    return lambda steps: frozenset(range(every, steps, every) if every else ())


def spread(count: int) -> Callable[[int], frozenset[int]]:
    """The steps a job of ``steps`` previews after, for ``count`` previews (OpenAI's
    ``partial_images``): spread evenly, never after the last step; fewer where the steps
    are fewer."""
    return lambda steps: frozenset(
        step for i in range(1, count + 1) if 0 < (step := round(steps * i / (count + 1))) < steps
    )


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
    write: Events,
    ended: Callable[[int, JobResult | None], None],
    request_id: str = "",
) -> AsyncIterator[bytes]:
    """The stream of a queued job as ``write`` writes it: its progress, then its result or
    its error (an unforeseen one logged with ``request_id``). ``ended(status, result)`` is
    told how it ended (499: the client went away, which cancels the job)."""
    status, result = 499, None
    try:
        while True:
            getter = asyncio.ensure_future(progress.events.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                break
            if chunk := await _told(write, getter.result()):
                yield chunk
        while not progress.events.empty():  # told before the task ended
            if chunk := await _told(write, progress.events.get_nowait()):
                yield chunk
        try:
            result, _ = task.result()
            body = await off_loop(None, write.result, result)
            status = 200
            yield body
        except Exception as exc:  # this request's failure alone
            failure = as_bad_request(exc, request_id)
            status = failure.status
            yield write.error(failure)
    finally:
        if not task.done():  # the client went away mid-stream
            task.cancel()  # run_job cancels the job
        elif not task.cancelled():
            task.exception()  # read (run_job may have seen the client go first): not logged
        ended(status, result)


async def _told(write: Events, told: Told) -> bytes:
    if told[2] is None:
        return write.told(*told)
    return await off_loop(None, write.told, *told)
