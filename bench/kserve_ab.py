"""What a request's picture costs on the wire, per protocol of ``sdtrt serve``: reading one
from a request and writing one answer, in the Open Inference Protocol's binary form and its
JSON form (KServe v2, Triton's HTTP API: serve/kserve.py), in its gRPC form (raw and typed
contents: serve/grpc_api.py, from the serialised message), and ``/v1/img2img``'s base64
PNG in, PNG out. The server's CPU work per request besides denoising, one process, no network:
the runs alternate after a warm-up round; the figures are medians over the repeats.

    python -m sdtrt.bench.kserve_ab [--size 512] [--repeats 7] [--json out.json]

The picture is photo-like, as bench/serve_loop_ab.py makes it (random pixels at 1/16 of
the size, upscaled bicubic): PNG's cost depends on what it compresses (sdtrt's sample
picture, flat colours, is 13 times smaller as a PNG and 3 times faster to write).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image

from sdtrt.bench.timing import alternate
from sdtrt.serve import kserve
from sdtrt.serve.app import decode_base64, decode_image, encode_answer
from sdtrt.serve.fields import IMAGE_FORMATS
from sdtrt.serve.jobs import JobResult


def requests(picture: PIL.Image.Image) -> dict[str, Callable[[], PIL.Image.Image]]:
    """How each protocol's request gives the server the picture, from the body's bytes."""
    pixels = np.asarray(picture)
    shape = list(pixels.shape)
    image = {"name": "image", "datatype": "UINT8", "shape": shape}
    json_body = json.dumps({"inputs": [{**image, "data": pixels.reshape(-1).tolist()}]}).encode()
    binary_image = {**image, "parameters": {"binary_data_size": pixels.size}}
    head = json.dumps({"inputs": [binary_image]}).encode()
    binary_body = head + pixels.tobytes()
    encoded = io.BytesIO()
    picture.save(encoded, format="PNG")
    v1_body = json.dumps({"image": base64.b64encode(encoded.getvalue()).decode()}).encode()
    limit = pixels.shape[0] * pixels.shape[1]

    def v2(body: bytes, length: str | None) -> PIL.Image.Image:
        load = kserve.parse_infer(body, length, limit, decode_image).load
        assert load is not None
        return load()

    grpc_raw, grpc_typed = _grpc_bodies(pixels)

    def grpc(body: bytes) -> PIL.Image.Image:
        from sdtrt.serve.grpc_api import messages, read_infer

        request = messages()["ModelInferRequest"].FromString(body)
        load = read_infer(request, limit).load
        assert load is not None
        return load()

    return {
        "v2 binary": lambda: v2(binary_body, str(len(head))),
        "v2 JSON": lambda: v2(json_body, None),
        "v1 base64 PNG": lambda: decode_image(decode_base64(json.loads(v1_body)["image"])),
        "gRPC raw": lambda: grpc(grpc_raw),
        "gRPC typed": lambda: grpc(grpc_typed),
    }


def _grpc_bodies(pixels: np.ndarray) -> tuple[bytes, bytes]:
    """A ModelInferRequest of the picture, serialised: in raw_input_contents (what
    tritonclient sends) and in typed contents (uint_contents: one varint per element)."""
    from sdtrt.serve.grpc_api import messages

    bodies = []
    for raw in (True, False):
        request = messages()["ModelInferRequest"](model_name="img2img")
        tensor = request.inputs.add(name="image", datatype="UINT8", shape=list(pixels.shape))
        if raw:
            request.raw_input_contents.append(pixels.tobytes())
        else:
            tensor.contents.uint_contents.extend(pixels.reshape(-1).tolist())
        bodies.append(request.SerializeToString())
    return bodies[0], bodies[1]


def answers(result: JobResult) -> dict[str, Callable[[], bytes]]:
    """How each protocol answers the job's picture: the body's bytes."""
    from sdtrt.serve.grpc_api import infer_response

    return {
        "v2 binary": lambda: kserve.answer(result, "img2img", None, binary=True)[0],
        "v2 JSON": lambda: kserve.answer(result, "img2img", None, binary=False)[0],
        "v1 PNG": lambda: bytes(encode_answer(result, "png").body),
        "gRPC raw": lambda: infer_response(result, "img2img", "").SerializeToString(),
    }


def measure(size: int = 512, repeats: int = 7) -> dict[str, Any]:
    """The record: per direction, each protocol's median ms and bytes, and the binary
    form's ratio to each; the pictures each way read back as the same pixels (checked)."""
    small = np.random.default_rng(0).integers(0, 256, (size // 16, size // 16, 3), np.uint8)
    picture = PIL.Image.fromarray(small).resize((size, size), PIL.Image.Resampling.BICUBIC)
    pixels = np.asarray(picture)
    read = requests(picture)
    for name, run in read.items():
        assert np.array_equal(np.asarray(run()), pixels), name
    result = JobResult([picture], [pixels / 255.0], 0, 0, 0.0, {})
    written = answers(result)
    sizes = {name: len(run()) for name, run in written.items()}
    record: dict[str, Any] = {"size": size, "repeats": repeats, "png": IMAGE_FORMATS["png"][1]}
    for direction, runs in (("read", read), ("answer", written)):
        ms = {name: stages["total"] for name, stages in alternate(runs, repeats)[0].items()}
        record[direction] = {
            name: {"ms": ms[name], "vs binary": ms[name] / ms["v2 binary"]} for name in runs
        }
    for name, size_bytes in sizes.items():
        record["answer"][name]["bytes"] = size_bytes
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="pixels a side")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="also write the record here")
    args = parser.parse_args()
    record = measure(args.size, args.repeats)
    print(f"{args.size}x{args.size} picture, medians of {args.repeats}:")
    for direction in ("read", "answer"):
        for name, row in record[direction].items():
            extra = f", {row['bytes']} bytes" if "bytes" in row else ""
            print(f"  {direction:6} {name:14} {row['ms']:8.2f} ms ({row['vs binary']:.0f}x){extra}")
    if args.json:
        from sdtrt.fileio import write_json

        write_json(args.json, record)


if __name__ == "__main__":
    main()
