"""What the server does with a request whatever its protocol (serve/app.py's ``/v1`` and
the Open Inference Protocol's ``/v2``): its body read within the limit, its API key and id,
its fields typed, its image decoded, and its job run, waited for and cancelled if the
client goes away; every failure a ``BadRequest`` with its HTTP status."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import secrets
import uuid
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from typing import Any, TypeVar

import PIL.Image
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from sdtrt.errors import DeadlineExceededError, InvalidInputError, ServerBusyError
from sdtrt.serve.batcher import StepBatcher
from sdtrt.serve.fields import IMAGE_FORMATS, TEXTS
from sdtrt.serve.jobs import Job, JobResult, ProgressHook
from sdtrt.serve.options import ServeOptions

logger = logging.getLogger(__name__)
T = TypeVar("T")


class BadRequest(Exception):
    """A request answered with an HTTP error: its status, message (the protocols' error
    object, ``{"error": message}``) and headers (429's Retry-After)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def as_bad_request(exc: BaseException, request_id: str) -> BadRequest:
    """A request's failure as a BadRequest: itself, else a 500 (unforeseen: still this
    request's alone; logged with its traceback)."""
    if isinstance(exc, BadRequest):
        return exc
    logger.error("request %s failed", request_id, exc_info=exc)
    return BadRequest(500, f"{type(exc).__name__}: {exc}")


async def off_loop(executor: Executor | None, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` in ``executor`` (None: the event loop's default thread pool)."""
    return await asyncio.get_running_loop().run_in_executor(executor, work, *args)


def request_id_of(headers: Mapping[str, str], given: str = "") -> str:
    """The caller's id (``given``: a protocol's own field, else the X-Request-ID header or
    gRPC metadata: a proxy's, to follow one request through the logs) where it is a short
    printable token, else a new one; every answer carries it back."""
    given = given or headers.get("x-request-id", "")
    if 0 < len(given) <= 128 and given.isprintable() and given.isascii():
        return given
    return uuid.uuid4().hex


async def run_job(
    gone: Callable[[], Awaitable[bool]] | None,
    request_id: str,
    batcher: StepBatcher,
    intake: Executor,
    values: dict[str, Any],
    load: Callable[[], PIL.Image.Image] | None,
    *,
    timeout: Any = None,
    priority: Any = None,
    before_queue: Callable[[Job], None] | None = None,
    progress: ProgressHook | None = None,
    previews: Callable[[int], frozenset[int]] | None = None,
) -> JobResult:
    """One request's job, whatever protocol brought it: its image loaded (``load``; None:
    the sample picture) and the request checked in the intake thread, queued, and waited
    for; BadRequest with the status of each failure. The job is cancelled if the client
    goes away: ``gone()`` says so (HTTP's is_disconnected), or the waiting task is
    cancelled (gRPC cancels a call's handler). ``before_queue(job)``: called with the
    checked job before it is queued: what the protocol can answer (InvalidInputError:
    422), or where it keeps its jobs (A1111's interrupt). ``progress(done,
    steps)``: told (0, None) once the job is queued, then after each of its steps (from the
    worker's thread), and ``progress(done, steps, images)`` after the steps that
    ``previews(steps)`` gives (the job's steps run: 1 the first). ``timeout`` (seconds)
    and ``priority`` (Triton's), as the request gave them (None: not given), are the
    batcher's ``prepare``'s."""
    timeout = field_value(timeout, float, "timeout")
    priority = field_value(priority, int, "priority") or 0
    if timeout is not None and not 0 < timeout <= batcher.timeout:
        raise BadRequest(422, f"timeout must be in (0, {batcher.timeout}] seconds")
    try:
        job = await off_loop(intake, _prepare, batcher, values, load, timeout, priority)
        if before_queue is not None:
            before_queue(job)
        job.progress = progress
        if previews is not None and progress is not None:
            job.preview_steps = previews(job.request.num_inference_steps - job.t_start)
        future = batcher.submit(job)
        if progress is not None:
            progress(0, None)
    except InvalidInputError as exc:
        raise BadRequest(422, str(exc)) from None
    except ServerBusyError as exc:
        if batcher.draining or batcher.stopped:
            raise BadRequest(503, str(exc)) from None
        raise BadRequest(429, str(exc), {"Retry-After": "1"}) from None
    waiting = asyncio.wrap_future(future)
    try:
        while not waiting.done():
            done, _ = await asyncio.wait({waiting}, timeout=0.05)
            if not done and gone is not None and await gone():
                raise BadRequest(499, "the client went away")  # nginx's status; nobody reads it
    except (BadRequest, asyncio.CancelledError) as exc:
        job.cancel()  # dropped at the next iteration
        waiting.add_done_callback(_read)  # its RequestCancelledError is expected
        why = "the client went away" if isinstance(exc, BadRequest) else "it was cancelled"
        # (a cancelled wait: gRPC's call ended, or another image of an A1111 call failed)
        logger.info("request %s: %s; its job is cancelled", request_id, why)
        raise
    try:
        return waiting.result()
    except DeadlineExceededError as exc:
        raise BadRequest(504, str(exc)) from None
    except Exception as exc:  # this job's failure (non-finite output...), nobody else's
        logger.warning("request %s failed: %s", request_id, exc)
        raise BadRequest(500, f"{type(exc).__name__}: {exc}") from None


def _read(future: asyncio.Future[Any]) -> None:
    """Reads a future's outcome, so that asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


def _prepare(
    batcher: StepBatcher,
    values: dict[str, Any],
    load: Callable[[], PIL.Image.Image] | None,
    timeout: float | None,
    priority: int,
) -> Job:
    image = load() if load is not None else None
    request = batcher.request(image=image, **values)
    return batcher.prepare(request, timeout=timeout, priority=priority)


async def read_body(request: Request, options: ServeOptions) -> bytes:
    """The request's body, read up to the server's limit (413 past it)."""
    limit = int(options.max_body_mb * 1024 * 1024)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BadRequest(413, f"the body is over this server's limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(413, f"the body is over this server's limit of {limit} bytes")
    return bytes(body)


def field_value(value: Any, kind: type, name: str) -> Any:
    """A field in its type; form fields arrive as text. None stays None (default)."""
    if value is None:
        return None
    if kind is str:
        if name in TEXTS and isinstance(value, list | tuple):
            if value and all(isinstance(text, str) for text in value):
                return tuple(value)
            raise BadRequest(422, f"{name} must be a string or a non-empty list of strings")
        if not isinstance(value, str):
            raise BadRequest(422, f"{name} must be a string, got {value!r}")
        return value
    if kind is list:
        return _numbers(value, name)
    if isinstance(value, bool):
        raise BadRequest(422, f"{name} must be a number, got {value!r}")
    try:
        if kind is int:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        return float(value)
    except (TypeError, ValueError, OverflowError):
        what = "an integer" if kind is int else "a number"
        raise BadRequest(422, f"{name} must be {what}, got {value!r}") from None


def _numbers(value: Any, name: str) -> tuple[float, ...]:
    """A list field: a JSON list of numbers, or a form's "999,850,736"."""
    from sdtrt.options import parse_numbers

    if isinstance(value, str):
        try:
            return parse_numbers(value)
        except InvalidInputError as exc:
            raise BadRequest(422, f"{name}: {exc}") from None
    if not isinstance(value, list) or not all(
        isinstance(n, int | float) and not isinstance(n, bool) for n in value
    ):
        raise BadRequest(422, f"{name} must be a list of numbers, got {value!r}")
    return tuple(float(n) for n in value)


def decode_base64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise BadRequest(400, "image must be a base64 string (or a data: URL)")
    if value.startswith(("http://", "https://")):
        raise BadRequest(400, "image is a URL: this server fetches nothing; send the image's bytes")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(400, f"image is not valid base64: {exc}") from None


def decode_image(data: bytes) -> PIL.Image.Image:
    """Decode an image, refusing oversized ones from the header, before pixels are read."""
    from sdtrt.runtime.inputs import Limits, upright_rgb

    limit = Limits.from_env().max_pixels
    try:
        image = PIL.Image.open(io.BytesIO(data))
        if image.width * image.height > limit:
            raise BadRequest(
                422,
                f"the image is {image.width}x{image.height} = {image.width * image.height} "
                f"pixels, over this server's limit of {limit} (SDTRT_MAX_PIXELS)",
            )
        image.load()
        return upright_rgb(image)
    except BadRequest:
        raise
    except (OSError, PIL.UnidentifiedImageError, ValueError, PIL.Image.DecompressionBombError):
        raise BadRequest(400, "image is not an image Pillow reads (PNG, JPEG, WebP...)") from None


WRONG_KEY = (
    "missing or wrong API key (Authorization: Bearer KEY, X-API-Key, or HTTP basic with the "
    "key as the password)"
)


def key_given(api_key: str | None, headers: Mapping[str, str]) -> bool:
    """Whether a request's headers (gRPC's metadata) carry the server's API key, if it has
    one: ``Authorization: Bearer KEY``, ``X-API-Key: KEY`` (names in lower case), or HTTP
    Basic with the key as its password, any user name (how A1111's clients send
    ``--api-auth``)."""
    if api_key is None:
        return True
    given = headers.get("x-api-key", "")
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    elif auth.lower().startswith("basic "):
        try:
            given = base64.b64decode(auth[6:].strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            given = ""
    return secrets.compare_digest(given.encode(), api_key.encode())


def wrong_key() -> BadRequest:
    """What a request without the server's API key is answered (401)."""
    return BadRequest(401, WRONG_KEY, {"WWW-Authenticate": "Bearer"})


def unauthorised(
    request: Request,
    options: ServeOptions,
    failed: Callable[[BaseException, str], Response] | None = None,
) -> Response | None:
    """None where the request carries the server's key (``key_given``), else its 401 as the
    protocol writes a failure (``failed(exc, request_id)``; by default ``{"error": message}``)."""
    if key_given(options.api_key, request.headers):
        return None
    failure = wrong_key()
    if failed is not None:
        return failed(failure, request_id_of(request.headers))
    return JSONResponse({"error": failure.message}, failure.status, headers=failure.headers)


async def read_form(
    request: Request, body: bytes, repeated: tuple[str, ...] = TEXTS
) -> dict[str, Any]:
    """The multipart form, parsed from the body already read (and bounded): text fields as
    strings, files as bytes; a field of ``repeated`` sent more than once as a list of them."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request as StarletteRequest

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await StarletteRequest(request.scope, receive).form()
    except Exception as exc:  # python-multipart's parse errors
        raise BadRequest(400, f"the multipart body cannot be parsed: {exc}") from None
    out: dict[str, Any] = {}
    try:
        for key, item in form.multi_items():
            value = await item.read() if isinstance(item, UploadFile) else item
            if key in repeated and key in out:  # -F prompt=a -F prompt=b: a list of prompts
                before = out[key]
                out[key] = [*before, value] if isinstance(before, list) else [before, value]
            else:
                out[key] = value
    finally:
        await form.close()  # each upload's spooled temporary file
    return out


ANSWER_HEADERS = ("X-Seed", "X-Unet-Calls", "X-Queue-Wait-Ms")
"""The headers an image answer carries (``answer_headers``)."""


def answer_headers(result: JobResult) -> dict[str, str]:
    """The job's figures as an image answer's headers (ANSWER_HEADERS)."""
    figures = (str(result.seed), str(result.unet_calls), f"{result.queue_wait_ms:.3f}")
    return dict(zip(ANSWER_HEADERS, figures, strict=True))


def encoded(result: JobResult, image_format: str, quality: int | None = None) -> list[bytes]:
    """The job's images as files of ``image_format`` (``encoded_images``)."""
    return encoded_images(result.images, image_format, quality)


def encoded_images(
    images: list[PIL.Image.Image], image_format: str, quality: int | None = None
) -> list[bytes]:
    """``images`` as files of ``image_format``: IMAGE_FORMATS' settings, but for the lossy
    formats' ``quality`` (0-100) where one is given."""
    name, settings = IMAGE_FORMATS[image_format]
    if quality is not None:
        settings = {**settings, "quality": quality}
    files = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format=name, **settings)
        files.append(buffer.getvalue())
    return files


def json_answer(result: JobResult) -> dict[str, Any]:
    """The JSON answer's body: the images as PNG files in base64, with the job's figures."""
    files = [base64.b64encode(png).decode() for png in encoded(result, "png")]
    return {
        "image": files[0],
        "images": files,
        "width": result.image.width,
        "height": result.image.height,
        "seed": result.seed,
        "unet_calls": result.unet_calls,
        "queue_wait_ms": result.queue_wait_ms,
        "timings_ms": result.timings_ms,
    }
