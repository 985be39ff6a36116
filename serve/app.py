"""The HTTP API over the step batcher (FastAPI): ``POST /v1/img2img`` (its fields and
their description at /docs: serve/fields.py), ``GET /health``, ``GET /ready`` and
``GET /metrics`` (Prometheus); the same requests in the Open Inference Protocol (KServe v2,
Triton's HTTP API) under ``/v2`` (serve/kserve.py reads and writes its messages), as
OpenAI's image edits (serve/openai_images.py) and as A1111's img2img (serve/a1111.py). What
each does with a request (its body, key, fields, image and job) is serve/handling.py's.

Every bad input is a 4xx with the library's own message; a full queue is 429 with
Retry-After, a request past its deadline 504; a client that goes away cancels its job at the
next denoising step. Nothing one request does reaches past its own job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sdtrt.errors import InvalidInputError
from sdtrt.serve import kserve, streaming
from sdtrt.serve.a1111 import add_a1111_api
from sdtrt.serve.batcher import StepBatcher
from sdtrt.serve.fields import OPTIONS, TYPES, openapi
from sdtrt.serve.handling import (
    ANSWER_HEADERS,
    BadRequest,
    answer_headers,
    as_bad_request,
    decode_base64,
    decode_image,
    encoded,
    field_value,
    json_answer,
    key_given,
    off_loop,
    read_body,
    read_form,
    request_id_of,
    run_job,
    unauthorised,
    wrong_key,
)
from sdtrt.serve.jobs import Job, JobResult, ProgressHook
from sdtrt.serve.metrics import Metrics
from sdtrt.serve.openai_images import add_openai_images
from sdtrt.serve.options import ServeOptions

logger = logging.getLogger(__name__)


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
        grpc_server = None
        if options.grpc_port is not None:  # the same calls over gRPC (serve/grpc_api.py)
            from sdtrt.serve.grpc_api import GrpcServer, InferenceService

            service = InferenceService(batcher, options, intake, metrics, readiness)
            grpc_server = GrpcServer(service)
            app.state.grpc_port = grpc_server.start()
        yield
        if grpc_server is not None:  # its calls in flight finish first
            grpc_server.stop(options.drain_timeout)
        batcher.close()
        intake.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="sdtrt",
        summary="Stable Diffusion img2img, batched at every denoising step",
        lifespan=lifespan,
    )
    if options.cors_origins:  # browsers' scripts on those pages may call the API
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(options.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-API-Key", "X-Request-ID"],
            expose_headers=[*EXPOSED_HEADERS],
            max_age=600,
        )
    metrics = Metrics(batcher)
    app.state.sdtrt = state
    app.state.batcher = batcher

    @app.get("/health")
    def health() -> Response:
        """Liveness: the batching worker runs (503 once it has stopped: restart the server).
        The process id tells replicas apart behind a proxy (Ray Serve)."""
        if not batcher.alive:
            return JSONResponse({"status": "stopped", "pid": os.getpid()}, status_code=503)
        return JSONResponse({"status": "alive", "pid": os.getpid()})

    def readiness() -> str:
        """draining, loading (warming up) or ready: what /ready and /v2's ready answer."""
        if state["draining"] or batcher.draining:
            return "draining"
        return "ready" if state["ready"] else "loading"

    @app.get("/ready")
    def ready() -> Response:
        status = readiness()
        return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)

    @app.get("/metrics")
    def prometheus(request: Request) -> Response:
        if failure := unauthorised(request, options):
            return failure
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def handled(
        request: Request,
        serve: Callable[[str], Awaitable[tuple[JobResult, Encoder]]],
        failed: Callable[[BaseException, str], Response] | None = None,
    ) -> Response:
        """A request answered by ``serve(request_id)``: authorised, counted, its failure
        ``failed(exc, request_id)`` (by default the protocols' one error object ``{"error":
        message}`` with its status)."""
        arrived = time.monotonic()
        request_id = request_id_of(request.headers)
        try:
            if not key_given(options.api_key, request.headers):
                raise wrong_key()
            result, encode = await serve(request_id)
            # Encoding the answer takes longer still (a 512x512 PNG: ~15 ms, 2048x2048:
            # ~0.25 s): Pillow alone, which lets go of the GIL, so the default pool's threads
            # encode side by side.
            response = await off_loop(None, encode, result)
            metrics.answered(result, time.monotonic() - arrived)
        except Exception as exc:
            response = (failed or error_response)(exc, request_id)
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

    async def streamed_answer(
        request: Request,
        serve: Callable[[str, streaming.Progress], Coroutine[Any, Any, tuple[JobResult, Any]]],
        write: streaming.Events,
        failed: Callable[[BaseException, str], Response] | None = None,
    ) -> Response:
        """A request answered by server-sent events while ``serve(request_id, progress)``
        runs its job (``write`` writes them): authorised, counted; refused before its job is
        queued, answered as ``handled`` answers (``failed``: its error object)."""
        arrived = time.monotonic()
        request_id = request_id_of(request.headers)
        headers = {"X-Request-ID": request_id} if answer_request_id else {}
        failed = failed or error_response
        progress = streaming.Progress()
        if not key_given(options.api_key, request.headers):
            response = failed(wrong_key(), request_id)
        else:
            task = asyncio.create_task(serve(request_id, progress))
            if await streaming.queued(task, progress):

                def ended(status: int, result: JobResult | None) -> None:
                    metrics.requests.labels(str(status)).inc()
                    if result is not None:
                        metrics.answered(result, time.monotonic() - arrived)

                return StreamingResponse(
                    streaming.events(task, progress, write, ended, request_id),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", **headers},
                )
            response = failed(task.exception() or RuntimeError("not queued"), request_id)
        response.headers.update(headers)
        metrics.requests.labels(str(response.status_code)).inc()
        return response

    @app.post("/v1/img2img/stream", response_class=Response, openapi_extra=streamed(documented))
    async def img2img_stream(request: Request) -> Response:
        async def serve(request_id: str, progress: streaming.Progress) -> tuple[JobResult, str]:
            return await _serve(request, request_id, batcher, options, intake, progress)

        return await streamed_answer(request, serve, streaming.Events())

    _add_inference_protocol(app, handled, batcher, options, intake, lambda: readiness() == "ready")
    add_openai_images(app, handled, streamed_answer, batcher, options, intake)
    add_a1111_api(app, handled, batcher, options, intake)
    return app


# The answers' headers a browser's script may read (CORS).
EXPOSED_HEADERS = (*ANSWER_HEADERS, "X-Request-ID", "Retry-After")
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
    def server_live() -> Response:
        live = batcher.alive  # the protocol's 4xx for false, as for ready
        return JSONResponse({"live": live}, status_code=200 if live else 400)

    @app.get("/v2/health/ready")
    def server_ready() -> Response:
        ready = is_ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 400)

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    def model_metadata(request: Request, model: str, version: str = kserve.VERSION) -> Response:
        if failure := unauthorised(request, options) or unknown(model, version):
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
            body = await read_body(request, options)
            try:  # off the loop: JSON tensors take long to read (a 512x512 picture: 57 ms)
                inference = await off_loop(
                    intake,
                    kserve.parse_infer,
                    body,
                    request.headers.get(kserve.HEADER_LENGTH),
                    Limits.from_env().max_pixels,
                    decode_image,
                )
            except kserve.ProtocolError as exc:
                raise BadRequest(exc.status, exc.message) from None
            values = {k: field_value(v, TYPES[k], k) for k, v in inference.values.items()}
            result = await run_job(
                request.is_disconnected, request_id, batcher, intake, values, inference.load,
                timeout=inference.timeout, priority=inference.priority,
            )  # fmt: skip
            return result, lambda done: _inference_answer(done, name, inference)

        return await handled(request, serve)


def _inference_answer(result: JobResult, model: str, inference: kserve.Inference) -> Response:
    body, headers = kserve.answer(result, model, inference.id, inference.binary)
    return Response(body, headers=headers)


def error_response(exc: BaseException, request_id: str) -> JSONResponse:
    """A request's failure as the protocols' error object, ``{"error": message}``, with its
    status: a BadRequest's, else 500 (unforeseen: still this request's alone)."""
    failure = as_bad_request(exc, request_id)
    return JSONResponse({"error": failure.message}, failure.status, headers=failure.headers)


def streamed(documented: dict[str, Any]) -> dict[str, Any]:
    """/docs for the stream: /v1/img2img's request, its answer a stream of events."""
    answer = {
        "description": "Server-sent events: queued, step {step, steps} after each UNet step, "
        "then result (the JSON answer of response_format=json) or error {error, status}.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    return {**documented, "responses": {**documented["responses"], "200": answer}}


async def _serve(
    request: Request,
    request_id: str,
    batcher: StepBatcher,
    options: ServeOptions,
    intake: Executor,
    progress: ProgressHook | None = None,
) -> tuple[JobResult, str]:
    """The request's result and the format to answer in; BadRequest where there is none.
    ``progress``: a stream's (its answer is the JSON one)."""
    values, image_bytes = await _parse(request, options)
    per_request = {k: values.pop(k) for k in OPTIONS if k in values}
    response_format = per_request.get("response_format", "png")
    if "application/json" in request.headers.get("accept", ""):
        response_format = "json"
    if response_format not in OPTIONS["response_format"]["enum"]:
        allowed = ", ".join(OPTIONS["response_format"]["enum"])
        raise BadRequest(422, f"response_format must be one of {allowed}, got {response_format!r}")
    every = streaming.preview_every(
        per_request.get("preview_every"), progress is not None,
        "in the stream (POST /v1/img2img/stream)",
    )  # fmt: skip
    if progress is not None and response_format not in ("png", "json"):
        raise BadRequest(
            422, "a stream's result is the JSON answer, PNGs in base64: response_format json "
            f"or none, not {response_format}"
        )  # fmt: skip

    def answerable(job: Job) -> None:
        if job.images > 1 and response_format != "json" and progress is None:
            raise InvalidInputError(
                f"{job.images} images come as JSON: send response_format json (or Accept: "
                f"application/json), not {response_format}"
            )

    load = None if image_bytes is None else functools.partial(decode_image, image_bytes)
    result = await run_job(
        request.is_disconnected, request_id, batcher, intake, values, load,
        timeout=per_request.get("timeout"), priority=per_request.get("priority"),
        before_queue=answerable, progress=progress, previews=streaming.every_nth(every),
    )  # fmt: skip
    return result, response_format


def encode_answer(result: JobResult, response_format: str) -> Response:
    headers = answer_headers(result)
    if response_format == "json":
        return JSONResponse(json_answer(result), headers=headers)
    (file,) = encoded(result, response_format)  # one image (prepare refused more)
    return Response(file, media_type=f"image/{response_format}", headers=headers)


async def _parse(request: Request, options: ServeOptions) -> tuple[dict[str, Any], bytes | None]:
    """The img2img fields and the image's bytes from a JSON or multipart body."""
    body = await read_body(request, options)
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
        form = await read_form(request, bytes(body))
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
        k: v if k in OPTIONS else field_value(v, TYPES[k], k)
        for k, v in raw.items()
        if v is not None
    }
    return values, image_bytes


def _form_value(name: str, value: Any) -> Any:
    if isinstance(value, list):  # a repeated text field: several prompts
        return [_form_value(name, item) for item in value]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if name in TYPES and TYPES[name] is not str and value == "":
        return None
    return value


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
