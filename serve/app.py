"""The HTTP API over the step batcher (FastAPI): ``POST /v1/img2img`` (its fields and
their description at /docs: serve/fields.py), ``GET /health``, ``GET /ready`` and
``GET /metrics`` (Prometheus); the same requests in the Open Inference Protocol (KServe v2,
Triton's HTTP API) under ``/v2`` (serve/kserve.py reads and writes its messages).

Every bad input is a 4xx with the library's own message; a full queue is 429 with
Retry-After, a request past its deadline 504; a client that goes away cancels its job at the
next denoising step. Nothing one request does reaches past its own job.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import functools
import io
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

import PIL.Image
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from sdtrt.errors import DeadlineExceededError, InvalidInputError, ServerBusyError
from sdtrt.options import ServeOptions
from sdtrt.runtime.inputs import is_integer
from sdtrt.serve import kserve
from sdtrt.serve.batcher import StepBatcher
from sdtrt.serve.fields import IMAGE_FORMATS, OPTIONS, TEXTS, TYPES, openapi
from sdtrt.serve.jobs import Job, JobResult

logger = logging.getLogger(__name__)
T = TypeVar("T")


class BadRequest(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Metrics:
    def __init__(self, batcher: StepBatcher) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "sdtrt_requests", "img2img requests by HTTP status", ["status"], registry=registry
        )
        self.images = Counter(
            "sdtrt_images", "images answered (num_images_per_prompt per request)", registry=registry
        )
        self.latency = Histogram(
            "sdtrt_request_latency_seconds",
            "img2img request latency, arrival to answer",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=registry,
        )
        self.queue_wait = Histogram(
            "sdtrt_queue_wait_seconds",
            "time from arrival to admission into the batch",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16),
            registry=registry,
        )
        self.stages = Histogram(
            "sdtrt_stage_seconds",
            "a request's time in each stage: the batched calls it took part in",
            ["stage"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
            registry=registry,
        )
        self.rows = Histogram(
            "sdtrt_unet_rows_per_call",
            "UNet rows ([uncond, cond] per guided image) per batched call",
            buckets=(1, 2, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=registry,
        )
        queue = Gauge("sdtrt_queue_depth", "requests waiting for admission", registry=registry)
        queue.set_function(lambda: len(batcher.waiting))
        active = Gauge("sdtrt_active_jobs", "requests being denoised", registry=registry)
        active.set_function(lambda: len(batcher.active))
        batcher.stats.on_unet_call.append(self.rows.observe)

    def answered(self, result: JobResult, seconds: float) -> None:
        """A request answered 200 after ``seconds``."""
        self.images.inc(len(result.images))
        self.latency.observe(seconds)
        self.queue_wait.observe(result.queue_wait_ms / 1e3)
        for stage, ms in result.timings_ms.items():
            if stage != "total":  # the request's latency, above
                self.stages.labels(stage).observe(ms / 1e3)


def create_app(
    batcher: StepBatcher,
    options: ServeOptions = ServeOptions(),
    warmup: bool = True,
    answer_request_id: bool = True,
) -> FastAPI:
    """The app over ``batcher``. ``warmup``: one small request runs before /ready says
    200 (kernel selection, CUDA graphs); /health answers meanwhile.
    ``answer_request_id``: set X-Request-ID on img2img answers (False where a proxy in
    front does, as Ray Serve's does)."""
    state: dict[str, Any] = {"ready": not warmup, "draining": False}
    # Decoding and preprocessing a request's image take milliseconds (a 1024x1024 PNG:
    # ~30 ms), run off the event loop so that /health and the other requests are not held
    # up behind them. One thread: preprocessing runs PyTorch ops, and every thread that
    # runs them keeps its own OpenMP pool (several pools oversubscribe the cores).
    intake = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdtrt-intake")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if warmup:  # in the background: /health answers, /ready says 503 until done
            threading.Thread(target=warm_up, args=(batcher, state), daemon=True).start()
        yield
        batcher.close()
        intake.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="sdtrt",
        summary="Stable Diffusion img2img, batched at every denoising step",
        lifespan=lifespan,
    )
    metrics = Metrics(batcher)
    app.state.sdtrt = state
    app.state.batcher = batcher

    @app.get("/health")
    def health() -> dict[str, Any]:
        # The process id tells replicas apart behind a proxy (Ray Serve).
        return {"status": "alive", "pid": os.getpid()}

    @app.get("/ready")
    def ready() -> Response:
        if state["draining"] or batcher.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not state["ready"]:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    def prometheus(request: Request) -> Response:
        if failure := _unauthorised(request, options):
            return failure
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def handled(
        request: Request, serve: Callable[[str], Awaitable[tuple[JobResult, Encoder]]]
    ) -> Response:
        """A request answered by ``serve(request_id)``: authorised, counted, its failure
        the protocols' one error object ``{"error": message}`` with its status."""
        arrived = time.monotonic()
        if failure := _unauthorised(request, options):
            metrics.requests.labels("401").inc()
            return failure
        request_id = _request_id(request)
        try:
            result, encode = await serve(request_id)
            # Encoding the answer takes longer still (a 512x512 PNG: ~15 ms, 2048x2048:
            # ~0.25 s): Pillow alone, which lets go of the GIL, so the default pool's threads
            # encode side by side.
            response = await _off_loop(None, encode, result)
            metrics.answered(result, time.monotonic() - arrived)
        except BadRequest as exc:
            response = JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)
        except Exception as exc:  # unforeseen: still this request's 500 alone, and counted
            logger.exception("request %s failed", request_id)
            response = JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, 500)
        if answer_request_id:
            response.headers["X-Request-ID"] = request_id
        metrics.requests.labels(str(response.status_code)).inc()
        return response

    documented = openapi(batcher.request_defaults)

    @app.post("/v1/img2img", response_class=Response, openapi_extra=documented)
    async def img2img(request: Request) -> Response:
        async def serve(request_id: str) -> tuple[JobResult, Encoder]:
            result, response_format = await _serve(request, request_id, batcher, options, intake)
            return result, lambda done: encode_answer(done, response_format)

        return await handled(request, serve)

    def is_ready() -> bool:
        return bool(state["ready"]) and not (state["draining"] or batcher.draining)

    _add_inference_protocol(app, handled, batcher, options, intake, is_ready)
    return app


Encoder = Callable[[JobResult], Response]
"""How a protocol answers a job's result (run in a thread: image encoding takes long)."""


def _add_inference_protocol(
    app: FastAPI,
    handled: Callable[..., Awaitable[Response]],
    batcher: StepBatcher,
    options: ServeOptions,
    intake: Executor,
    is_ready: Callable[[], bool],
) -> None:
    """The Open Inference Protocol's health, metadata and inference endpoints (KServe v2,
    Triton's HTTP API; serve/kserve.py reads and writes its messages): one model,
    ``options.model_name`` version 1, run as ``/v1/img2img`` runs a request."""
    from sdtrt import __version__
    from sdtrt.runtime.inputs import Limits

    name = options.model_name
    metadata = kserve.model_metadata(name, batcher.backend.name)

    def unknown(model: str, version: str) -> Response | None:
        if model == name and version == kserve.VERSION:
            return None
        return JSONResponse(
            {"error": f"unknown model {model!r} version {version!r}: this server has "
                      f"{name}, version {kserve.VERSION}"},
            status_code=404,
        )  # fmt: skip

    @app.get("/v2")
    def server_metadata() -> dict[str, Any]:
        return {"name": "sdtrt", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    def server_live() -> dict[str, bool]:
        return {"live": True}

    @app.get("/v2/health/ready")
    def server_ready() -> Response:
        ready = is_ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 400)

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    def model_metadata(request: Request, model: str, version: str = kserve.VERSION) -> Response:
        if failure := _unauthorised(request, options) or unknown(model, version):
            return failure
        return JSONResponse(metadata)

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    def model_ready(model: str, version: str = kserve.VERSION) -> Response:
        if failure := unknown(model, version):
            return failure
        ready = is_ready()
        return JSONResponse({"name": model, "ready": ready}, status_code=200 if ready else 400)

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def model_infer(request: Request, model: str, version: str = kserve.VERSION) -> Response:
        if failure := unknown(model, version):
            return failure

        async def serve(request_id: str) -> tuple[JobResult, Encoder]:
            body = await _body(request, options)
            try:  # off the loop: JSON tensors take long to read (a 512x512 picture: 57 ms)
                inference = await _off_loop(
                    intake,
                    kserve.parse_infer,
                    body,
                    request.headers.get(kserve.HEADER_LENGTH),
                    Limits.from_env().max_pixels,
                    decode_image,
                )
            except kserve.ProtocolError as exc:
                raise BadRequest(exc.status, exc.message) from None
            values = {k: _number(v, TYPES[k], k) for k, v in inference.values.items()}
            timeout = _number(inference.timeout, float, "timeout")
            result = await run_job(
                request, request_id, batcher, intake, values, inference.load, timeout
            )
            return result, lambda done: _inference_answer(done, name, inference)

        return await handled(request, serve)


def _inference_answer(result: JobResult, model: str, inference: kserve.Inference) -> Response:
    body, headers = kserve.answer(result, model, inference.id, inference.binary)
    return Response(body, headers=headers)


async def _off_loop(executor: Executor | None, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` in ``executor`` (None: the event loop's default thread pool)."""
    return await asyncio.get_running_loop().run_in_executor(executor, work, *args)


def _request_id(request: Request) -> str:
    """The caller's X-Request-ID (a proxy's, to follow one request through the logs) where
    it is a short printable token, else a new one; every answer carries it back."""
    given = request.headers.get("x-request-id", "")
    if 0 < len(given) <= 128 and given.isprintable() and given.isascii():
        return given
    return uuid.uuid4().hex


async def _serve(
    request: Request,
    request_id: str,
    batcher: StepBatcher,
    options: ServeOptions,
    intake: Executor,
) -> tuple[JobResult, str]:
    """The request's result and the format to answer in; BadRequest where there is none."""
    values, image_bytes = await _parse(request, options)
    per_request = {k: values.pop(k) for k in OPTIONS if k in values}
    response_format = per_request.get("response_format", "png")
    if "application/json" in request.headers.get("accept", ""):
        response_format = "json"
    if response_format not in OPTIONS["response_format"]["enum"]:
        allowed = ", ".join(OPTIONS["response_format"]["enum"])
        raise BadRequest(422, f"response_format must be one of {allowed}, got {response_format!r}")
    prompts = values.get("prompt")
    each = values.get("num_images_per_prompt", 1)
    images = each * (len(prompts) if isinstance(prompts, tuple) else 1)
    if is_integer(images) and images > 1 and response_format != "json":
        raise BadRequest(
            422,
            f"{images} images come as JSON: send response_format json (or Accept: "
            f"application/json), not {response_format}",
        )
    timeout = _number(per_request.get("timeout"), float, "timeout")
    load = None if image_bytes is None else functools.partial(decode_image, image_bytes)
    result = await run_job(request, request_id, batcher, intake, values, load, timeout)
    return result, response_format


async def run_job(
    request: Request,
    request_id: str,
    batcher: StepBatcher,
    intake: Executor,
    values: dict[str, Any],
    load: Callable[[], PIL.Image.Image] | None,
    timeout: float | None,
) -> JobResult:
    """One request's job, whatever protocol brought it: its image loaded (``load``; None:
    the sample picture) and the request checked in the intake thread, queued, and waited
    for, cancelled if the client goes away; BadRequest with the status of each failure."""
    if timeout is not None and not 0 < timeout <= batcher.timeout:
        raise BadRequest(422, f"timeout must be in (0, {batcher.timeout}] seconds")
    try:
        job = await _off_loop(intake, _prepare, batcher, values, load, timeout)
        future = batcher.submit(job)
    except InvalidInputError as exc:
        raise BadRequest(422, str(exc)) from None
    except ServerBusyError as exc:
        if batcher.draining:
            raise BadRequest(503, str(exc)) from None
        raise BadRequest(429, str(exc), {"Retry-After": "1"}) from None
    waiting = asyncio.wrap_future(future)
    while not waiting.done():
        done, _ = await asyncio.wait({waiting}, timeout=0.05)
        if not done and await request.is_disconnected():
            job.cancel()  # dropped at the next iteration
            logger.info("request %s: the client went away; its job is cancelled", request_id)
            raise BadRequest(499, "the client went away")  # nginx's status; nobody reads it
    try:
        return waiting.result()
    except DeadlineExceededError as exc:
        raise BadRequest(504, str(exc)) from None
    except Exception as exc:  # this job's failure (non-finite output...), nobody else's
        logger.warning("request %s failed: %s", request_id, exc)
        raise BadRequest(500, f"{type(exc).__name__}: {exc}") from None


def _prepare(
    batcher: StepBatcher,
    values: dict[str, Any],
    load: Callable[[], PIL.Image.Image] | None,
    timeout: float | None,
) -> Job:
    image = load() if load is not None else None
    return batcher.prepare(batcher.request(image=image, **values), timeout=timeout)


def encode_answer(result: JobResult, response_format: str) -> Response:
    image_format = "png" if response_format == "json" else response_format
    name, settings = IMAGE_FORMATS[image_format]
    files = []
    for image in result.images:
        encoded = io.BytesIO()
        image.save(encoded, format=name, **settings)
        files.append(encoded.getvalue())
    headers = {
        "X-Seed": str(result.seed),
        "X-Unet-Calls": str(result.unet_calls),
        "X-Queue-Wait-Ms": f"{result.queue_wait_ms:.3f}",
    }
    if response_format != "json":  # one image (prepare refused more)
        return Response(files[0], media_type=f"image/{image_format}", headers=headers)
    pngs = [base64.b64encode(file).decode() for file in files]
    body = {
        "image": pngs[0],
        "images": pngs,
        "width": result.image.width,
        "height": result.image.height,
        "seed": result.seed,
        "unet_calls": result.unet_calls,
        "queue_wait_ms": result.queue_wait_ms,
        "timings_ms": result.timings_ms,
    }
    return JSONResponse(body, headers=headers)


async def _parse(request: Request, options: ServeOptions) -> tuple[dict[str, Any], bytes | None]:
    """The img2img fields and the image's bytes from a JSON or multipart body."""
    body = await _body(request, options)
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
    raw: dict[str, Any]
    image_bytes: bytes | None = None
    if kind == "application/json":
        try:
            raw = json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise BadRequest(400, "the JSON body must be an object of img2img fields")
        if raw.get("image") is not None:
            image_bytes = decode_base64(raw.pop("image"))
        raw.pop("image", None)
    elif kind == "multipart/form-data":
        form = await _form(request, bytes(body))
        upload = form.pop("image", None)
        if upload is not None:
            image_bytes = upload if isinstance(upload, bytes) else upload.encode()
        raw = {k: _form_value(k, v) for k, v in form.items()}
    else:
        raise BadRequest(415, f"send application/json or multipart/form-data, not {kind}")
    unknown = sorted(set(raw) - set(TYPES) - set(OPTIONS))
    if unknown:
        allowed = ", ".join(["image", *TYPES, *OPTIONS])
        raise BadRequest(422, f"unknown field(s) {', '.join(unknown)}; allowed: {allowed}")
    # null or an empty form field: the default, as if the field were not sent
    values = {
        k: v if k in OPTIONS else _number(v, TYPES[k], k) for k, v in raw.items() if v is not None
    }
    return values, image_bytes


async def _body(request: Request, options: ServeOptions) -> bytes:
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


async def _form(request: Request, body: bytes) -> dict[str, Any]:
    """The multipart form, parsed from the body already read (and bounded)."""
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
            if key in TEXTS and key in out:  # -F prompt=a -F prompt=b: a list of prompts
                before = out[key]
                out[key] = [*before, value] if isinstance(before, list) else [before, value]
            else:
                out[key] = value
    finally:
        await form.close()  # each upload's spooled temporary file
    return out


def _form_value(name: str, value: Any) -> Any:
    if isinstance(value, list):  # a repeated text field: several prompts
        return [_form_value(name, item) for item in value]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if name in TYPES and TYPES[name] is not str and value == "":
        return None
    return value


def _number(value: Any, kind: type, name: str) -> Any:
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


def _unauthorised(request: Request, options: ServeOptions) -> Response | None:
    if options.api_key is None:
        return None
    given = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if secrets.compare_digest(given.encode(), options.api_key.encode()):
        return None
    return JSONResponse(
        {"error": "missing or wrong API key (Authorization: Bearer KEY, or X-API-Key)"},
        status_code=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


def warm_up(batcher: StepBatcher, state: dict[str, Any]) -> None:
    """The warm-up sizes' shapes (the worker runs them first), then one small request
    through the whole path, with the server's scheduler and guidance (an unguided server's
    one-row UNet call); /ready says 200 after both."""
    request = batcher.request(num_inference_steps=2, strength=1.0)  # the sample image's size
    if batcher.backend.pixel_range is not None:  # engines' profiles: their smallest size
        (height, _), (width, _) = batcher.backend.pixel_range
        request = dataclasses.replace(request, height=height, width=width)
    if batcher.warmed.exception() is not None:  # waits for it; the worker has logged how
        state["warmup_failed"] = True
        logger.error("warming up the shapes failed: /ready stays 503")
        return
    try:
        batcher.submit(batcher.prepare(request)).result(timeout=600)
        state["ready"] = True
        logger.info("warmed up: ready")
    except Exception:
        state["warmup_failed"] = True
        logger.exception("the warm-up request failed: /ready stays 503")
