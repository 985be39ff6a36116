"""OpenAI's Images API over the step batcher: ``POST /v1/images/edits`` (an image and a prompt
in, images out: img2img) and ``GET /v1/models``, so that a client written for OpenAI's API
(the ``openai`` SDK given ``base_url``) calls sdtrt as it calls OpenAI.

OpenAI's form fields are read as its API defines them (``n`` images, ``size`` as
WIDTHxHEIGHT, ``output_format`` with ``output_compression``, ``response_format`` b64_json,
``stream`` with ``partial_images``); /v1/img2img's own fields (``strength``, ``seed``,
``num_inference_steps``...) come beside them (the SDK's ``extra_body``). What sdtrt cannot
do as asked (a mask, a URL answer, transparency, a quality tier) is refused, not ignored.
Errors are OpenAI's error object.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any

import PIL.Image
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sdtrt.serve.batcher import StepBatcher
from sdtrt.serve.fields import IMAGE_FORMATS, TEXTS, TYPES, openapi
from sdtrt.serve.handling import (
    BadRequest,
    answer_headers,
    as_bad_request,
    decode_image,
    encoded,
    encoded_images,
    field_value,
    key_given,
    read_body,
    read_form,
    request_id_of,
    run_job,
    unauthorised,
    wrong_key,
)
from sdtrt.serve.jobs import JobResult, ProgressHook
from sdtrt.serve.options import ServeOptions
from sdtrt.serve.streaming import Events, event, spread

# /v1/img2img's fields that OpenAI's API names otherwise: n, and size (WIDTHxHEIGHT).
_RENAMED = {"num_images_per_prompt": "n", "height": "size", "width": "size"}
SDTRT_FIELDS = tuple(name for name in [*TYPES, "timeout", "priority"] if name not in _RENAMED)
"""/v1/img2img's fields an edit may carry beside OpenAI's (the SDK's ``extra_body``)."""
# OpenAI's fields that sdtrt takes only at the value that asks for nothing it lacks, and
# what to say otherwise.
_ONLY: dict[str, tuple[tuple[str, ...], str]] = {
    "response_format": (("b64_json",), "this server keeps no files to link to"),
    "background": (("auto", "opaque"), "Stable Diffusion draws no transparency"),
    "quality": (("auto",), "sdtrt's quality knob is num_inference_steps"),
}
_REFUSED = {
    "mask": "a mask asks for inpainting; this server runs img2img on the whole image",
    "markup": "markup asks for an edit this server does not make; it runs img2img",
}
_IGNORED = ("user", "safety_identifier")  # OpenAI's abuse monitoring: nothing to do here
_OUTPUT_FORMATS = tuple(IMAGE_FORMATS)
# OpenAI's error types by status (its API answers invalid arguments with 400).
_CODES = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}


def add_openai_images(
    app: FastAPI,
    handled: Callable[..., Awaitable[Response]],
    streamed: Callable[..., Awaitable[Response]],
    batcher: StepBatcher,
    options: ServeOptions,
    intake: Executor,
) -> None:
    """OpenAI's ``/v1/images/edits`` and ``/v1/models`` on ``app``; the one model is
    ``options.model_name``, run as ``/v1/img2img`` runs a request (``handled``: the app's
    way of answering one, ``streamed`` of answering one as events; here with OpenAI's error
    object)."""
    model_name = options.model_name
    created = int(time.time())

    def described() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "sdtrt"}

    @app.get("/v1/models")
    def models(request: Request) -> Response:
        if failure := unauthorised(request, options, error_object):
            return failure
        return JSONResponse({"object": "list", "data": [described()]})

    @app.get("/v1/models/{model}")
    def model(request: Request, model: str) -> Response:
        if failure := unauthorised(request, options, error_object):
            return failure
        if model != model_name:
            return error_object(BadRequest(404, _unknown_model(model, model_name)), "")
        return JSONResponse(described())

    @app.post("/v1/images/edits", response_class=Response, openapi_extra=documented(batcher))
    async def edits(request: Request) -> Response:
        # The form says whether to stream: read once the key is known good (without it,
        # handled answers 401 before run, and the body is never read).
        edit: Edit | BadRequest = wrong_key()
        if key_given(options.api_key, request.headers):
            edit = await _read(request, options, model_name)
        output_format = edit.output_format if isinstance(edit, Edit) else "png"
        quality = edit.output_compression if isinstance(edit, Edit) else None

        async def run(request_id: str, progress: ProgressHook | None = None) -> JobResult:
            if isinstance(edit, BadRequest):
                raise edit
            return await run_job(
                request.is_disconnected,
                request_id,
                batcher,
                intake,
                edit.values,
                lambda: decode_image(edit.image),
                timeout=edit.timeout,
                priority=edit.priority,
                progress=progress,
                previews=spread(edit.partial_images),
            )

        async def serve(request_id: str) -> tuple[JobResult, Callable[[JobResult], Response]]:
            result = await run(request_id)
            return result, lambda done: _answer(done, output_format, quality)

        async def serve_streamed(request_id: str, progress: ProgressHook) -> tuple[JobResult, None]:
            return await run(request_id, progress), None

        if isinstance(edit, Edit) and edit.stream:
            return await streamed(request, serve_streamed, EditEvents(edit), error_object)
        return await handled(request, serve, error_object)


async def _read(request: Request, options: ServeOptions, model_name: str) -> Edit | BadRequest:
    """The edit a request's form asks for, or why it cannot be read."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind != "multipart/form-data":
        return BadRequest(
            400, f"send multipart/form-data, as OpenAI's images/edits takes, not {kind}"
        )
    try:
        body = await read_body(request, options)
        form = await read_form(request, body, repeated=(*TEXTS, "image", "image[]"))
        return read_edit(form, model_name)
    except Exception as exc:  # answered as the request's failure, as handled answers one
        return as_bad_request(exc, request_id_of(request.headers))


class EditEvents(Events):
    """OpenAI's stream of an edit: ``image_edit.partial_image`` for each preview's images
    (``partial_images``), ``image_edit.completed`` for each image, or ``error`` with OpenAI's
    error object; no event for steps."""

    def __init__(self, edit: Edit) -> None:
        self.output_format, self.quality = edit.output_format, edit.output_compression
        self.partials = 0

    def _events(self, kind: str, images: list[PIL.Image.Image], **more: Any) -> bytes:
        size = f"{images[0].width}x{images[0].height}"
        return b"".join(
            event(
                f"image_edit.{kind}",
                {
                    "type": f"image_edit.{kind}",
                    "b64_json": base64.b64encode(file).decode(),
                    "created_at": int(time.time()),
                    "size": size,
                    "quality": "auto",
                    "background": "opaque",
                    "output_format": self.output_format,
                    **more,
                },
            )
            for file in encoded_images(images, self.output_format, self.quality)
        )

    def told(self, done: int, steps: int | None, previews: list[PIL.Image.Image] | None) -> bytes:
        if previews is None:
            return b""
        self.partials += 1
        return self._events("partial_image", previews, partial_image_index=self.partials - 1)

    def result(self, result: JobResult) -> bytes:
        return self._events("completed", result.images)

    def error(self, failure: BadRequest) -> bytes:
        return event("error", {"type": "error", "error": openai_error(failure)[1]})


def documented(batcher: StepBatcher) -> dict[str, Any]:
    """What /docs shows of ``POST /v1/images/edits``: OpenAI's fields taken here, then
    /v1/img2img's (with the server's defaults) that may come beside them."""
    v1 = openapi(batcher.request_defaults)["requestBody"]["content"]["multipart/form-data"]
    text = {"type": "string"}
    fields = {
        "image": {"type": "string", "format": "binary", "description": "The input image."},
        "prompt": v1["schema"]["properties"]["prompt"],
        "model": {**text, "description": "The served model's id (GET /v1/models)."},
        "n": {"type": "integer", "default": 1, "description": "Images to make."},
        "size": {**text, "default": "auto", "description": "WIDTHxHEIGHT; auto: the image's."},
        "output_format": {**text, "enum": list(_OUTPUT_FORMATS), "default": "png"},
        "output_compression": {
            "type": "integer",
            "description": "jpeg and webp: their quality, 0-100 (without it: 95 and 90).",
        },
        **{name: {**text, "enum": list(allowed)} for name, (allowed, _) in _ONLY.items()},
        "stream": {"type": "boolean", "default": False, "description": "OpenAI's events."},
        "partial_images": {
            "type": "integer",
            "default": 0,
            "description": "0-3 previews in the stream, spread over the steps.",
        },
        **{name: v1["schema"]["properties"][name] for name in SDTRT_FIELDS if name != "prompt"},
    }
    body = {"multipart/form-data": {"schema": {"type": "object", "properties": fields}}}
    answer = {
        "description": "OpenAI's images response: data[].b64_json, with created, size, "
        "output_format; headers X-Seed, X-Unet-Calls, X-Queue-Wait-Ms.",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
    return {"requestBody": {"content": body}, "responses": {"200": answer}}


class Edit:
    """An edit request as the batcher takes it: the image's bytes, /v1/img2img's values, the
    answer's format (and a lossy one's quality), whether it streams (with how many previews)
    and the per-request options."""

    def __init__(
        self,
        image: bytes,
        values: dict[str, Any],
        output_format: str,
        stream: bool = False,
        partial_images: int = 0,
        output_compression: int | None = None,
    ) -> None:
        self.image, self.output_format = image, output_format
        self.output_compression = output_compression
        self.stream, self.partial_images = stream, partial_images
        self.timeout = values.pop("timeout", None)
        self.priority = values.pop("priority", None)
        self.values = values


def read_edit(form: dict[str, Any], model_name: str) -> Edit:
    """OpenAI's edit form (text fields as strings, files as bytes) as an ``Edit``; BadRequest
    (400, OpenAI's status for a bad argument) naming what is allowed."""
    form = dict(form)
    images = [form.pop(key) for key in ("image", "image[]") if key in form]
    files = [item for given in images for item in (given if isinstance(given, list) else [given])]
    if len(files) != 1:
        raise BadRequest(400, f"image: send one image file, got {len(files)}")
    if not isinstance(files[0], bytes):
        raise BadRequest(400, "image must be a file in the form, not a text field")
    if not form.get("prompt"):  # /v1 has a default prompt; OpenAI's API requires one
        raise BadRequest(400, "prompt is required: what the edited image should show")
    model = form.pop("model", "") or model_name
    if model != model_name:
        raise BadRequest(404, _unknown_model(model, model_name))
    for name, why in _REFUSED.items():
        if name in form:
            raise BadRequest(400, f"{name}: {why}")
    for name, (allowed, why) in _ONLY.items():
        value = str(form.pop(name, allowed[0])).lower()
        if value not in allowed:
            raise BadRequest(400, f"{name} {value!r}: {why} (allowed: {', '.join(allowed)})")
    for name in _IGNORED:
        form.pop(name, None)
    stream = str(form.pop("stream", "false")).lower()
    if stream not in ("true", "false"):
        raise BadRequest(400, f"stream must be true or false, got {stream!r}")
    partial_images = field_value(form.pop("partial_images", None), int, "partial_images") or 0
    if not 0 <= partial_images <= 3 or (partial_images and stream == "false"):
        raise BadRequest(
            400, "partial_images must be in [0, 3], and they come in a stream (stream true); "
            f"got {partial_images}"
        )  # fmt: skip
    output_format = str(form.pop("output_format", "png")).lower()
    if output_format not in _OUTPUT_FORMATS:
        raise BadRequest(
            400, f"output_format must be one of {', '.join(_OUTPUT_FORMATS)}, got {output_format!r}"
        )
    compression = _compression(form.pop("output_compression", ""), output_format)
    values: dict[str, Any] = {}
    if "n" in form:
        values["num_images_per_prompt"] = field_value(form.pop("n"), int, "n")
    size = str(form.pop("size", "auto"))
    if size != "auto":
        values["width"], values["height"] = _size(size)
    unknown = sorted(set(form) - set(SDTRT_FIELDS))
    if unknown:
        taken = ["image", "prompt", "model", "n", "size", "output_format", "output_compression",
                 "stream", "partial_images", *_ONLY, *_IGNORED]  # fmt: skip
        raise BadRequest(
            400,
            f"unknown field(s) {', '.join(unknown)}; OpenAI's taken here: {', '.join(taken)};"
            f" sdtrt's: {', '.join(name for name in SDTRT_FIELDS if name != 'prompt')}",
        )
    for name, value in form.items():
        if isinstance(value, bytes):
            raise BadRequest(400, f"{name} must be a text field, not a file")
        if value == "" and TYPES.get(name, str) is not str:
            continue  # an empty form field: the default, as /v1/img2img takes it
        # timeout and priority as given: run_job reads them
        values[name] = field_value(value, TYPES[name], name) if name in TYPES else value
    # OpenAI's edits differ call by call: a seed of its own unless one is asked for (the
    # answer's X-Seed header says which, so any image can be made again).
    values.setdefault("seed", secrets.randbelow(2**32))
    return Edit(files[0], values, output_format, stream == "true", partial_images, compression)


def _compression(given: Any, output_format: str) -> int | None:
    """OpenAI's ``output_compression`` (0-100, 100 its default): a jpeg's or webp's quality
    (Pillow's scale); None where not given, the server's settings then. A png is lossless:
    only 100 (no loss) is taken with it."""
    if given == "":
        return None
    value = field_value(given, int, "output_compression")
    if not 0 <= value <= 100 or (output_format == "png" and value != 100):
        raise BadRequest(
            400, "output_compression must be in [0, 100], for jpeg or webp (a png is lossless:"
            f" 100 or none); got {value} for {output_format}"
        )  # fmt: skip
    return int(value)


def _size(size: str) -> tuple[int, int]:
    """OpenAI's ``size``, WIDTHxHEIGHT, as (width, height)."""
    width, _, height = size.lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise BadRequest(400, f"size must be WIDTHxHEIGHT (e.g. 512x512) or auto, got {size!r}")
    return int(width), int(height)


def _unknown_model(model: str, model_name: str) -> str:
    return f"the model {model!r} does not exist: this server has {model_name!r}"


def _answer(result: JobResult, output_format: str, quality: int | None) -> Response:
    files = encoded(result, output_format, quality)
    body = {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(file).decode()} for file in files],
        "background": "opaque",
        "output_format": output_format,
        "size": f"{result.image.width}x{result.image.height}",
    }
    return JSONResponse(body, headers=answer_headers(result))


def error_object(exc: BaseException, request_id: str) -> JSONResponse:
    """A failure as OpenAI's error object, ``{"error": {"message", "type", "param",
    "code"}}`` (``openai_error``)."""
    failure = as_bad_request(exc, request_id)
    status, error = openai_error(failure)
    return JSONResponse({"error": error}, status, headers=failure.headers)


def openai_error(failure: BadRequest) -> tuple[int, dict[str, Any]]:
    """OpenAI's status and error for a failure: a bad argument (sdtrt's 422) is OpenAI's 400
    ``invalid_request_error``, a failure of the server's ``server_error``; other statuses
    are /v1/img2img's."""
    status = 400 if failure.status == 422 else failure.status
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return status, {
        "message": failure.message, "type": kind, "param": None, "code": _CODES.get(status),
    }  # fmt: skip
