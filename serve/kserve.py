"""The Open Inference Protocol (KServe v2, the HTTP/REST API of NVIDIA Triton) over the same
batcher as ``/v1/img2img``: a client of the protocol (NVIDIA's ``tritonclient.http``, which
the tests run) calls sdtrt's one model (``img2img`` unless ``sdtrt serve --model-name``
names it) as it calls any other.

Inputs are the img2img fields by name: ``prompt`` and ``negative_prompt`` as BYTES [N] (N
prompts: diffusers' list), ``scheduler`` as BYTES [1]; ``image`` as UINT8 [H, W, 3] (or [1,
H, W, 3]) RGB pixels, or BYTES [1] holding an encoded file (raw in binary form; base64 in
JSON, where BYTES are text); the numbers as any numeric datatype of one element, or as the
request's ``parameters``; ``timesteps`` and ``sigmas`` as numeric [N]. The output ``image``
is UINT8 [N, H, W, 3], N the images (prompts x images per prompt); the seed, UNet calls
and queue wait come in the response's ``parameters``. Triton's binary tensor data
extension is taken and given (``binary_data_size``, ``binary_data``,
``binary_data_output``, the ``Inference-Header-Content-Length`` header).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image

from sdtrt.serve.fields import TEXTS, TYPES
from sdtrt.serve.jobs import JobResult

VERSION = "1"
HEADER_LENGTH = "inference-header-content-length"
# The protocol's tensor datatypes, as numpy reads them (little-endian, as the binary form is).
DTYPES: dict[str, Any] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_TEXT = ("prompt", "negative_prompt", "scheduler")
_LISTS = ("timesteps", "sigmas")
_METADATA_TYPES = {str: "BYTES", int: "INT64", float: "FP64", list: "FP64"}
# Request parameters that are not img2img fields: Triton's schedule policy, its binary form,
# previews (gRPC's ModelStreamInfer answers with them).
_POLICY = ("timeout", "priority", "binary_data_output", "preview_every")


class ProtocolError(Exception):
    """A request the protocol cannot read: its HTTP status and message (the app answers
    them as the protocol's error object, ``{"error": message}``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def model_metadata(name: str, backend: str) -> dict[str, Any]:
    """``GET /v2/models/NAME``: the inputs a request may send (all optional: the server's
    defaults stand for those left out) and the output."""
    inputs = [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, 3]}]
    for field, kind in TYPES.items():
        shape = [-1] if kind is list or field in TEXTS else [1]
        inputs.append({"name": field, "datatype": _METADATA_TYPES[kind], "shape": shape})
    return {
        "name": name,
        "versions": [VERSION],
        "platform": f"sdtrt_{backend}",
        "inputs": inputs,
        "outputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}],
    }


def read_request(
    body: bytes, header_length: str | None
) -> tuple[dict[str, Any], dict[str, np.ndarray], set[str], bool]:
    """An inference request's JSON object, its input tensors by name (BYTES as object arrays
    of bytes), the names of those sent in binary form, and whether the image is asked for
    in binary form. ProtocolError(400) names what is wrong."""
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ProtocolError(400, f"Inference-Header-Content-Length {header_length!r} is not "
                                f"a length within the body's {len(body)} bytes")  # fmt: skip
        body, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        request = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(400, f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs", []), list):
        raise ProtocolError(400, "the inference request must be an object with an inputs list")
    tensors: dict[str, np.ndarray] = {}
    binary_inputs, offset = set(), 0
    rest = memoryview(binary)  # each input's bytes are viewed, not copied
    for entry in request.get("inputs", []):
        name, array, size = _tensor(entry, rest[offset:])
        if name in tensors:
            raise ProtocolError(400, f"input {name!r} is given twice")
        tensors[name] = array
        offset += size or 0
        if size is not None:
            binary_inputs.add(name)
    if offset != len(binary):
        raise ProtocolError(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ProtocolError(400, "parameters must be an object")
    binary_out = parameters.get("binary_data_output", False) is True
    for entry in request.get("outputs") or []:
        if not isinstance(entry, dict) or entry.get("name") != "image":
            raise ProtocolError(400, f"unknown output {entry!r}: this model's one output is image")
        asked = (entry.get("parameters") or {}).get("binary_data")
        binary_out = asked if isinstance(asked, bool) else binary_out
    return request, tensors, binary_inputs, binary_out


def _tensor(entry: Any, binary: memoryview) -> tuple[str, np.ndarray, int | None]:
    """One input tensor: its name, its array, and the binary bytes it took (None: it came
    as JSON data)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ProtocolError(400, f"an input must be an object with a name, got {entry!r}")
    name = entry["name"]
    datatype, shape = check_tensor(name, entry.get("datatype"), entry.get("shape"))
    size = (entry.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or not 0 <= size <= len(binary):
            raise ProtocolError(400, f"input {name}: binary_data_size {size!r} is past the body")
        return name, raw_tensor(name, datatype, shape, binary[:size]), size
    given = entry.get("data")
    if given is None:
        raise ProtocolError(400, f"input {name} has neither data nor binary_data_size")
    if datatype != "BYTES":
        return name, typed_numbers(name, given, datatype, shape), None
    items = list(_flat(given))
    if not all(isinstance(item, str) for item in items):
        raise ProtocolError(400, f"input {name}: BYTES data in JSON are strings")
    return name, bytes_tensor(name, [str(item).encode() for item in items], shape), None


def check_tensor(name: str, datatype: Any, shape: Any) -> tuple[str, list[int]]:
    """A tensor's datatype (one of the protocol's) and shape (a list of sizes), checked."""
    if datatype != "BYTES" and datatype not in DTYPES:
        allowed = ", ".join([*DTYPES, "BYTES"])
        raise ProtocolError(400, f"input {name}: datatype {datatype!r} is not one of {allowed}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ProtocolError(400, f"input {name}: shape must be a list of sizes, got {shape!r}")
    return datatype, shape


def raw_tensor(name: str, datatype: str, shape: list[int], data: bytes | memoryview) -> np.ndarray:
    """A tensor from its raw bytes (the binary extension's, gRPC's raw_input_contents):
    numbers little-endian, row-major; BYTES elements each a 4-byte length, then its bytes."""
    if datatype == "BYTES":
        return bytes_tensor(name, _bytes_elements(name, memoryview(data)), shape)
    count = math.prod(shape)
    if len(data) != count * DTYPES[datatype].itemsize:
        raise ProtocolError(400, f"input {name}: {len(data)} bytes are not {count} {datatype}")
    return np.frombuffer(data, DTYPES[datatype]).reshape(shape)


def bytes_tensor(name: str, items: list[bytes], shape: list[int]) -> np.ndarray:
    """A BYTES tensor: an object array of Python bytes."""
    count = math.prod(shape)
    if len(items) != count:
        raise ProtocolError(400, f"input {name}: {len(items)} elements for shape {shape}")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array.reshape(shape)


# The values each datatype takes, by numpy's kind: a float is not an integer's value.
_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}


def typed_numbers(name: str, data: Any, datatype: str, shape: list[int]) -> np.ndarray:
    """A numeric tensor's elements as values (JSON data, flat or nested as its shape: the
    protocol allows both; gRPC's typed contents), read by numpy at once (an element at a
    time, a 512x512 picture took 0.17 s)."""
    dtype = DTYPES[datatype]
    try:
        raw = np.asarray(data)
    except ValueError:  # ragged nesting
        raw = np.asarray([np.nan])
    if raw.size and raw.dtype.kind not in _KINDS[dtype.kind]:
        raise ProtocolError(400, f"input {name}: its data are not {datatype}")
    array = raw.astype(dtype)
    if raw.dtype.kind in "iu" and not np.array_equal(array, raw):
        raise ProtocolError(400, f"input {name}: its data are out of {datatype}'s range")
    if array.size != math.prod(shape):
        raise ProtocolError(400, f"input {name}: {array.size} elements for shape {shape}")
    return array.reshape(shape)


def _flat(data: Any) -> Any:
    if isinstance(data, list):
        for item in data:
            yield from _flat(item)
    else:
        yield data


def _bytes_elements(name: str, data: memoryview) -> list[bytes]:
    """BYTES in binary form: each element a 4-byte little-endian length, then its bytes."""
    items, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            raise ProtocolError(400, f"input {name}: a BYTES element's length is cut short")
        length = int.from_bytes(data[at : at + 4], "little")
        if at + 4 + length > len(data):
            raise ProtocolError(400, f"input {name}: a BYTES element runs past its data")
        items.append(bytes(data[at + 4 : at + 4 + length]))
        at += 4 + length
    return items


def img2img_values(
    tensors: dict[str, np.ndarray], parameters: dict[str, Any]
) -> tuple[dict[str, Any], float | None, Any]:
    """The img2img fields of a request's tensors but its image and of its parameters (as
    ``/v1`` takes them), its timeout in seconds and its priority (Triton's schedule-policy
    parameters). ProtocolError(400) for a name the model does not take, or one given twice."""
    values: dict[str, Any] = {}
    for name, array in tensors.items():
        if name == "image":
            continue
        if name not in TYPES:
            allowed = ", ".join(["image", *TYPES])
            raise ProtocolError(400, f"unknown input {name!r}; this model takes {allowed}")
        values[name] = _field(name, array)
    timeout = _seconds(parameters.get("timeout"))
    for name, value in parameters.items():
        if name in _POLICY:
            continue
        if name not in TYPES or name in _LISTS:
            names = [n for n in TYPES if n not in _LISTS] + ["timeout", "priority", "preview_every"]
            allowed = ", ".join(names)
            raise ProtocolError(400, f"unknown parameter {name!r}; parameters: {allowed}")
        if name in values:
            raise ProtocolError(400, f"{name} is given as an input and as a parameter")
        values[name] = value
    return values, timeout, parameters.get("priority")


def _seconds(microseconds: Any) -> float | None:
    """Triton's ``timeout`` request parameter (its schedule-policy extension; what
    tritonclient's ``infer(timeout=...)`` sends): the request's time in microseconds, 0 or
    none for the server's own; in seconds."""
    if microseconds is None:
        return None
    if isinstance(microseconds, bool) or not isinstance(microseconds, int) or microseconds < 0:
        raise ProtocolError(
            400, "timeout is the request's time in microseconds (Triton's schedule-policy "
            f"parameter), an integer >= 0, got {microseconds!r}"
        )  # fmt: skip
    return microseconds / 1e6 or None  # 0: the server's own


def _field(name: str, array: np.ndarray) -> Any:
    """One field's value from its tensor: text from BYTES [1] (prompts: BYTES [N], N
    prompts as diffusers' list), a number from any one numeric element, a list from a
    numeric [N]."""
    if name in _TEXT:
        several = name in TEXTS
        if array.dtype != object or array.ndim != 1 or not (array.size == 1 or several):
            got = f"{array.dtype} {list(array.shape)}"
            raise ProtocolError(400, f"input {name}: BYTES [{'N' if several else 1}], got {got}")
        try:
            texts = [item.decode() for item in array]
        except UnicodeDecodeError:
            raise ProtocolError(400, f"input {name} is not UTF-8 text") from None
        return texts[0] if len(texts) == 1 else tuple(texts)
    if array.dtype == object or array.dtype == np.bool_:
        raise ProtocolError(400, f"input {name}: a numeric datatype, got {array.dtype}")
    if name in _LISTS:
        return [_number(v) for v in array.reshape(-1)]
    if array.size != 1:
        raise ProtocolError(400, f"input {name}: one element, got shape {list(array.shape)}")
    return _number(array.reshape(-1)[0])


def _number(value: np.generic) -> int | float:
    """A Python number of a numpy element. FP16/FP32 are read as the shortest decimal that
    is that float (numpy's repr): 0.7 sent as FP32 is 0.699999988 exactly, which would
    make int(10 x strength) 6 steps where the client meant 7."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating) and value.dtype.itemsize < 8:
        return float(str(value))  # numpy's str: the shortest decimal that reads back as it
    return float(value)


def image_loader(
    array: np.ndarray | None, decode: Callable[[bytes], PIL.Image.Image], max_pixels: int
) -> Callable[[], PIL.Image.Image] | None:
    """How the intake thread gets the request's picture: UINT8 [H, W, 3] or [1, H, W, 3]
    pixels as they are; BYTES [1] decoded as ``/v1`` decodes a file (``decode``). The
    tensor's shape is checked here, on the event loop: it costs nothing."""
    if array is None:
        return None
    if array.dtype == object:
        if array.size != 1:
            raise ProtocolError(400, f"input image: BYTES [1] (one file), got {list(array.shape)}")
        data = array.reshape(-1)[0]
        return lambda: decode(data)
    if array.dtype != np.uint8 or array.ndim not in (3, 4) or array.shape[-1] != 3:
        raise ProtocolError(
            400, f"input image: UINT8 [H, W, 3] RGB pixels, got {array.dtype} {list(array.shape)}"
        )
    if array.ndim == 4 and array.shape[0] != 1:
        raise ProtocolError(400, f"input image: one picture per request, got {array.shape[0]}")
    height, width = int(array.shape[-3]), int(array.shape[-2])
    if height * width > max_pixels:
        raise ProtocolError(
            422, f"the image is {width}x{height} pixels, over this server's limit of "
            f"{max_pixels} (SDTRT_MAX_PIXELS)"
        )  # fmt: skip
    pixels = array.reshape(height, width, 3)
    return lambda: PIL.Image.fromarray(np.ascontiguousarray(pixels), "RGB")


def json_bytes_image(array: np.ndarray | None) -> np.ndarray | None:
    """An encoded image sent in JSON form is base64 text (BYTES in JSON are strings)."""
    if array is None or array.dtype != object or array.size != 1:
        return array
    try:
        decoded = base64.b64decode(array.reshape(-1)[0], validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(400, "input image: in JSON, an encoded file is base64") from None
    out = np.empty(1, dtype=object)
    out[0] = decoded
    return out


def answer(
    result: JobResult, model: str, request_id: str | None, binary: bool
) -> tuple[bytes, dict[str, str]]:
    """The inference response (its body and headers) for a job's images."""
    pixels = pixels_of(result.images)
    output: dict[str, Any] = {"name": "image", "datatype": "UINT8", "shape": list(pixels.shape)}
    raw = b""
    if binary:
        raw = pixels.tobytes()
        output["parameters"] = {"binary_data_size": len(raw)}
    else:
        output["data"] = pixels.reshape(-1).tolist()
    response: dict[str, Any] = {
        "model_name": model,
        "model_version": VERSION,
        "outputs": [output],
        "parameters": {
            "seed": result.seed,
            "unet_calls": result.unet_calls,
            "queue_wait_ms": result.queue_wait_ms,
        },
    }
    if request_id is not None:
        response["id"] = request_id
    head = json.dumps(response, separators=(",", ":")).encode()
    if not binary:
        return head, {"content-type": "application/json"}
    headers = {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
    return head + raw, headers


def pixels_of(images: list[PIL.Image.Image]) -> np.ndarray:
    """The output tensor ``image``: pictures (a job's images, its previews) as UINT8
    [N, H, W, 3]."""
    return np.stack([np.asarray(image.convert("RGB")) for image in images])


PREVIEWS_STREAMED = (
    "on gRPC's ModelStreamInfer (tritonclient's async_stream_infer), each a response of its own"
)
"""Where the protocol's previews (``preview_every``) come."""


@dataclass(frozen=True)
class Inference:
    """An inference request, read: what the app runs, and how it answers."""

    values: dict[str, Any]
    """The img2img fields, as ``/v1`` takes them (the server's defaults stand for the rest)."""
    load: Callable[[], PIL.Image.Image] | None
    """How the intake thread gets the picture; None: the sample picture."""
    timeout: float | None
    """Seconds (the request's ``timeout`` parameter is microseconds); None: the server's."""
    priority: Any
    """The request's ``priority`` parameter, as sent (the batcher checks it)."""
    binary: bool
    """Whether the image goes back in binary form."""
    id: str | None
    """The request's own id, echoed in the response."""
    preview_every: Any = None
    """The request's ``preview_every`` parameter, as sent: previews on gRPC's stream."""


def parse_infer(
    body: bytes, header_length: str | None, max_pixels: int, decode: Callable[[bytes], Any]
) -> Inference:
    """A whole inference request read (``decode``: how ``/v1`` decodes an image file).
    ProtocolError names what is wrong."""
    request, tensors, binary_inputs, binary = read_request(body, header_length)
    parameters = request.get("parameters") or {}
    values, timeout, priority = img2img_values(tensors, parameters)
    if parameters.get("preview_every"):
        raise ProtocolError(400, f"preview_every: previews come {PREVIEWS_STREAMED}")
    image = tensors.get("image")
    if "image" not in binary_inputs:
        image = json_bytes_image(image)
    load = image_loader(image, decode, max_pixels)
    given = request.get("id")
    given_id = given if isinstance(given, str) else None
    return Inference(values, load, timeout, priority, binary, given_id)
