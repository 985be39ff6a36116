"""The fields of ``POST /v1/img2img`` over HTTP: each one's type (form fields arrive as
text), the per-request options beside them, and what /docs shows of the endpoint (the body
is read by hand, JSON or multipart, refused with this API's own messages, so FastAPI
cannot see its fields)."""

from __future__ import annotations

import dataclasses
from typing import Any

from sdtrt.fileio import ENCODER_SETTINGS
from sdtrt.runtime.schedulers import SCHEDULERS
from sdtrt.serve.jobs import Img2ImgRequest

# The img2img fields: each one's type and what /docs says of it; their defaults are
# Img2ImgRequest's.
_UNIT = " (8 px on the torch backend, 64 px for SD graphs and engines)"
FIELDS: dict[str, tuple[type, str]] = {
    "prompt": (
        str,
        "What the image should show; or several (diffusers' batch: a JSON list, or the "
        "field repeated in a form): num_images_per_prompt images of each, from the one "
        "image and seed.",
    ),
    "negative_prompt": (
        str,
        "What it should not show (guidance's unconditional row): one for every prompt, or "
        "one per prompt (as prompt lists them).",
    ),
    "strength": (
        float,
        "In (0, 1]: how much of the schedule runs on the noised image. Or give start_step "
        "(the same knob).",
    ),
    "start_step": (int, "The first step's index, in [0, num_inference_steps)."),
    "num_inference_steps": (int, "Steps of the whole schedule (the server bounds it)."),
    "guidance_scale": (float, "Classifier-free guidance; 1 or less runs the prompt alone."),
    "scheduler": (str, f"One of {', '.join(SCHEDULERS)}."),
    "eta": (float, "DDIM's per-step noise (TCD's gamma), in [0, 1]; others ignore it."),
    "seed": (int, "In [0, 2^64 - 1]; the same seed gives the same image."),
    "height": (int, f"A multiple of the model's unit{_UNIT}; default: the image's."),
    "width": (int, f"A multiple of the model's unit{_UNIT}; default: the image's."),
    "timesteps": (
        list,
        "A schedule in place of num_inference_steps (diffusers' timesteps; euler, dpmpp_2m, "
        "lcm, tcd), descending integers: a JSON list, or 999,850,736 in a form.",
    ),
    "sigmas": (list, "Or its sigmas (euler): one more than the steps."),
    "guidance_cutoff": (
        float,
        "In [0, 1]: the share of the steps run under guidance (diffusers' "
        "SDCFGCutoffCallback's cutoff_step_ratio); the steps after it run the prompt alone, "
        "half the UNet's rows. Default: guided throughout.",
    ),
    "num_images_per_prompt": (
        int,
        "Images of the prompt, drawn from the one seed as diffusers draws a batch; more than "
        "one come as JSON (response_format json: the images list).",
    ),
    "resize_mode": (
        str,
        "How the image comes to height x width: default stretches it; fill fits it inside "
        "and fills the rest from its edges; crop fills the size and crops what is over "
        "(diffusers' image processor's modes).",
    ),
}
TYPES = {name: kind for name, (kind, _) in FIELDS.items()}
TEXTS = ("prompt", "negative_prompt")
"""The fields that take a string or a list of them."""
# The image formats an answer comes in: Pillow's name and its settings (sdtrt's, as for
# files). PNG answers at zlib's fastest level: for a photo-like 512x512, 15 ms and 390 KiB
# against Pillow's default level 6's 69 ms and 334 KiB (a server's latency over 17% more
# bytes); JPEG takes 0.7 ms, WebP 22 ms.
IMAGE_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    "png": ("PNG", {**ENCODER_SETTINGS["PNG"], "compress_level": 1}),
    "jpeg": ("JPEG", ENCODER_SETTINGS["JPEG"]),
    "webp": ("WEBP", ENCODER_SETTINGS["WEBP"]),
}
OPTIONS: dict[str, dict[str, Any]] = {
    "response_format": {
        "type": "string",
        "enum": [*IMAGE_FORMATS, "json"],
        "default": "png",
        "description": "png, jpeg (quality 95) or webp (quality 90): the image itself; "
        "json: a PNG in base64 with its metadata (also chosen by Accept: application/json).",
    },
    "timeout": {
        "type": "number",
        "description": "Seconds before the request is dropped (504); at most the server's.",
    },
    "priority": {
        "type": "integer",
        "default": 0,
        "description": "Its priority level on a server with levels (sdtrt serve "
        "--priority-levels N), as Triton's: 1 is admitted first, N last; 0 is N.",
    },
    "preview_every": {
        "type": "integer",
        "default": 0,
        "description": "The stream's previews (POST /v1/img2img/stream): after every N-th "
        "step, each image as that step estimates it finished (a VAE decode each); 0: none.",
    },
}
"""Per-request options beside the img2img fields, as /docs describes them."""


def openapi(server_defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """What /docs shows of ``POST /v1/img2img`` (FastAPI's ``openapi_extra``), with the
    server's defaults (``StepBatcher.request_defaults``) where it has its own."""
    json_type = {str: "string", int: "integer", float: "number", list: "array"}
    defaults = {f.name: f.default for f in dataclasses.fields(Img2ImgRequest)}
    defaults.update(server_defaults or {})
    fields: dict[str, Any] = {}
    for name, (kind, description) in FIELDS.items():
        fields[name] = {"type": json_type[kind], "description": description}
        if kind is list:
            fields[name]["items"] = {"type": "number"}
        if name in TEXTS:
            del fields[name]["type"]
            fields[name]["oneOf"] = [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1},
            ]
        if defaults[name] is not None:
            fields[name]["default"] = defaults[name]
    image = "The input image (PNG, JPEG, WebP...); default: sdtrt's sample picture."
    as_json = {"type": "string", "description": f"{image} Base64, or a data: URL."}
    as_file = {"type": "string", "format": "binary", "description": image}
    body = {
        kind: {"schema": {"type": "object", "properties": {"image": picture, **fields, **OPTIONS}}}
        for kind, picture in (("application/json", as_json), ("multipart/form-data", as_file))
    }
    number = {"type": "number"}
    metadata = {
        "image": {"type": "string", "description": "The PNG, base64 (the first image)."},
        "images": {
            "type": "array",
            "items": {"type": "string"},
            "description": "Every image's PNG, base64: num_images_per_prompt of each prompt.",
        },
        "width": {"type": "integer"},
        "height": {"type": "integer"},
        "seed": {"type": "integer"},
        "unet_calls": {"type": "integer", "description": "Batched UNet calls it took part in."},
        "queue_wait_ms": {**number, "description": "Arrival to admission into the batch."},
        "timings_ms": {
            "type": "object",
            "additionalProperties": number,
            "description": "Per stage (text_encoder, vae_encoder, denoise, vae_decoder; preview "
            "where a stream asked for previews), "
            "the batched calls it took part in, and total.",
        },
    }
    answer = {
        "description": "The image in its response_format, or JSON with response_format=json.",
        "headers": {
            name: {"schema": {"type": kind}}
            for name, kind in (
                ("X-Seed", "integer"),
                ("X-Unet-Calls", "integer"),
                ("X-Queue-Wait-Ms", "number"),
                ("X-Request-ID", "string"),  # on every answer: the caller's, else a new one
            )
        },
        "content": {
            **{
                f"image/{name}": {"schema": {"type": "string", "format": "binary"}}
                for name in IMAGE_FORMATS
            },
            "application/json": {"schema": {"type": "object", "properties": metadata}},
        },
    }
    error = {"schema": {"type": "object", "properties": {"error": {"type": "string"}}}}
    failures = {
        "400": "The body is not JSON, the image not base64 or not an image.",
        "401": "A missing or wrong API key (Authorization: Bearer KEY, or X-API-Key).",
        "413": "The body is over the server's limit.",
        "415": "Neither application/json nor multipart/form-data.",
        "422": "A field out of bounds or unknown: the message says what is allowed.",
        "429": "The queue is full: retry after Retry-After seconds.",
        "500": "This request failed (non-finite output...); other requests are unaffected.",
        "503": "The server is draining: it takes no new requests.",
        "504": "The request was past its deadline.",
    }
    responses = {
        "200": answer,
        **{
            status: {"description": what, "content": {"application/json": error}}
            for status, what in failures.items()
        },
    }
    return {"requestBody": {"content": body}, "responses": responses}
