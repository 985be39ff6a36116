"""The Open Inference Protocol (KServe v2, Triton's HTTP API) of ``sdtrt serve``: health,
metadata, and inference in JSON and in Triton's binary form, each answer the pixels
``/v1/img2img`` gives for the same request; and NVIDIA's own client, tritonclient, calling it."""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys

import httpx
import numpy as np
import PIL.Image
import pytest
from conftest import held_mid_call, noise_picture, png_bytes, serving, v1_images

from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.serve.kserve import ProtocolError, parse_infer
from sdtrt.serve.options import ServeOptions

KEY = {"Authorization": "Bearer secret"}
SMALL = {"num_inference_steps": 4, "strength": 0.5, "seed": 3}
INFER = "/v2/models/img2img/infer"


@pytest.fixture(scope="module")
def image():
    return noise_picture(1)


@pytest.fixture(scope="module")
def server(pipe):
    with serving(pipe, ServeOptions(api_key="secret")) as running:
        yield running


def _text(name, value):
    return {"name": name, "datatype": "BYTES", "shape": [1], "data": [value]}


def _pixels(image):
    array = np.asarray(image)
    return {"name": "image", "datatype": "UINT8", "shape": list(array.shape),
            "data": array.reshape(-1).tolist()}  # fmt: skip


def test_health_and_metadata_follow_the_protocol(server):
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{server.url}/v2/models/img2img/ready").status_code == 200
    meta = httpx.get(f"{server.url}/v2").json()
    assert meta["name"] == "sdtrt" and "binary_tensor_data" in meta["extensions"]
    model = httpx.get(f"{server.url}/v2/models/img2img", headers=KEY).json()
    assert model["name"] == "img2img" and model["versions"] == ["1"]
    inputs = {i["name"]: (i["datatype"], i["shape"]) for i in model["inputs"]}
    assert inputs["image"] == ("UINT8", [-1, -1, 3]) and inputs["prompt"] == ("BYTES", [-1])
    assert inputs["scheduler"] == ("BYTES", [1])
    assert inputs["seed"] == ("INT64", [1]) and inputs["timesteps"] == ("FP64", [-1])
    assert model["outputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]
    assert httpx.get(f"{server.url}/v2/models/img2img/versions/1", headers=KEY).json() == model
    other = httpx.get(f"{server.url}/v2/models/sd15", headers=KEY)
    assert other.status_code == 404 and "this server has img2img" in other.json()["error"]
    assert httpx.get(f"{server.url}/v2/models/img2img").status_code == 401  # its API key


def test_a_json_inference_answers_the_pixels_of_v1(server, image):
    """Pixels in, fields as tensors and as parameters; the output tensor is /v1's image,
    and the request's id and the job's seed and UNet calls come back."""
    (want,) = v1_images(server, image, {"prompt": "a cat", **SMALL})
    body = {
        "id": "r-1",
        "inputs": [_text("prompt", "a cat"), _pixels(image),
                   {"name": "strength", "datatype": "FP64", "shape": [1], "data": [0.5]}],
        "parameters": {"num_inference_steps": 4, "seed": 3},
    }  # fmt: skip
    answer = httpx.post(f"{server.url}{INFER}", json=body, headers=KEY, timeout=60)
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert got["model_name"] == "img2img" and got["id"] == "r-1"
    assert got["parameters"]["seed"] == 3 and got["parameters"]["unet_calls"] == 2
    (output,) = got["outputs"]
    assert output["name"] == "image" and output["datatype"] == "UINT8"
    assert output["shape"] == [1, 32, 48, 3]
    assert np.array_equal(np.asarray(output["data"], np.uint8).reshape(32, 48, 3), want)
    # An encoded file as the image: BYTES, base64 in JSON.
    file = base64.b64encode(png_bytes(image)).decode()
    body["inputs"][1] = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [file]}
    answer = httpx.post(f"{server.url}{INFER}", json=body, headers=KEY, timeout=60)
    assert np.array_equal(np.asarray(answer.json()["outputs"][0]["data"], np.uint8), want.ravel())


def _binary_request(inputs, parameters, binary_out=True):
    """Triton's binary form: the JSON header, then each input's bytes in order."""
    header, blobs = {"inputs": [], "parameters": parameters}, []
    for name, datatype, array in inputs:
        if datatype == "BYTES":
            data = b"".join(struct.pack("<I", len(v)) + v for v in array.reshape(-1))
        else:
            data = np.ascontiguousarray(array).tobytes()
        header["inputs"].append({"name": name, "datatype": datatype, "shape": list(array.shape),
                                 "parameters": {"binary_data_size": len(data)}})  # fmt: skip
        blobs.append(data)
    header["outputs"] = [{"name": "image", "parameters": {"binary_data": binary_out}}]
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head)), **KEY}


def test_a_binary_inference_reads_fp32_numbers_as_their_decimals(server, image):
    """FP32 strength 0.7 is 0.699999988: read as 0.7, 10 steps run int(10 x 0.7) = 7 UNet
    calls, as /v1 with 0.7 does (not 6); the image comes back as raw bytes."""
    fields = {"prompt": "a dog", "num_inference_steps": 10, "strength": 0.7, "seed": 5}
    (want,) = v1_images(server, image, fields)
    prompt = np.array([b"a dog"], dtype=object)
    strength = np.array([0.7], dtype=np.float32)
    body, headers = _binary_request(
        [("prompt", "BYTES", prompt), ("image", "UINT8", np.asarray(image)[None]),
         ("strength", "FP32", strength)],
        {"num_inference_steps": 10, "seed": 5},
    )  # fmt: skip
    answer = httpx.post(f"{server.url}{INFER}", content=body, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
    length = int(answer.headers["inference-header-content-length"])
    head = json.loads(answer.content[:length])
    assert head["parameters"]["unet_calls"] == 7
    (output,) = head["outputs"]
    assert output["parameters"]["binary_data_size"] == want.size and "data" not in output
    got = np.frombuffer(answer.content[length:], np.uint8).reshape(output["shape"])
    assert np.array_equal(got[0], want)


def _refusal(header, binary=b"", max_pixels=2048 * 2048):
    body = json.dumps(header).encode()
    length = str(len(body)) if binary else None
    with pytest.raises(ProtocolError) as refused:
        parse_infer(body + binary, length, max_pixels, lambda data: None)
    return refused.value


@pytest.mark.parametrize(
    "header, status, says",
    [
        ({"inputs": [{"name": "prompt", "datatype": "STRING", "shape": [1], "data": ["a"]}]},
         400, "datatype 'STRING' is not one of BOOL, UINT8"),
        ({"inputs": [{"name": "seed", "datatype": "INT64", "shape": [2], "data": [1]}]},
         400, "input seed: 1 elements for shape [2]"),
        ({"inputs": [{"name": "seed", "datatype": "INT64", "shape": [2], "data": [1, 2]}]},
         400, "input seed: one element, got shape [2]"),
        ({"inputs": [{"name": "colour", "datatype": "INT64", "shape": [1], "data": [1]}]},
         400, "unknown input 'colour'; this model takes image, prompt"),
        ({"inputs": [{"name": "seed", "datatype": "INT64", "shape": [1], "data": [1]}],
          "parameters": {"seed": 2}}, 400, "seed is given as an input and as a parameter"),
        ({"inputs": [], "parameters": {"sigmas": [1.0]}}, 400, "unknown parameter 'sigmas'"),
        ({"inputs": [], "outputs": [{"name": "latents"}]}, 400, "this model's one output is image"),
        ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [2, 2], "data": [0] * 4}]},
         400, "input image: UINT8 [H, W, 3] RGB pixels, got uint8 [2, 2]"),
        ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [3000, 3000, 3],
                      "parameters": {"binary_data_size": 27_000_000}}]},
         400, "binary_data_size 27000000 is past the body"),
        ([1, 2], 400, "must be an object with an inputs list"),
        ({"inputs": [{"name": "seed", "datatype": "INT64", "shape": [1], "data": [3.5]}]},
         400, "input seed: its data are not INT64"),
        ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 3],
                      "data": [0, 255, 256]}]}, 400, "its data are out of UINT8's range"),
        ({"inputs": [{"name": "seed", "datatype": "INT64", "shape": [1], "data": ["3"]}]},
         400, "input seed: its data are not INT64"),
    ],
)  # fmt: skip
def test_what_the_protocol_cannot_read_is_refused_naming_it(header, status, says):
    refused = _refusal(header)
    assert refused.status == status and says in refused.message


def test_json_data_may_be_nested_as_the_shape():
    """The protocol's JSON data are flat or nested row-major: both read alike."""
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    read = []
    for data in (pixels.reshape(-1).tolist(), pixels.tolist()):
        image = {"name": "image", "datatype": "UINT8", "shape": [2, 3, 3], "data": data}
        header = {"inputs": [image, {"name": "strength", "datatype": "FP32", "shape": [1],
                                     "data": [[0.25]]}]}  # fmt: skip
        inference = parse_infer(json.dumps(header).encode(), None, 64, lambda data: None)
        assert inference.values == {"strength": 0.25}
        read.append(np.asarray(inference.load()))
    assert np.array_equal(read[0], pixels) and np.array_equal(read[1], pixels)


def test_pixels_past_the_servers_limit_are_refused_from_the_shape():
    image = {"name": "image", "datatype": "UINT8", "shape": [65, 64, 3], "data": [0] * 12480}
    refused = _refusal({"inputs": [image]}, max_pixels=64 * 64)
    assert refused.status == 422
    assert refused.message == (
        "the image is 64x65 pixels, over this server's limit of 4096 (SDTRT_MAX_PIXELS)"
    )


def test_binary_data_must_add_up():
    seed = {
        "name": "seed",
        "datatype": "INT64",
        "shape": [1],
        "parameters": {"binary_data_size": 8},
    }
    refused = _refusal({"inputs": [seed]}, b"\x01" * 12)
    assert "4 bytes of binary data belong to no input" in refused.message
    refused = _refusal({"inputs": [{**seed, "parameters": {"binary_data_size": 4}}]}, b"\x01" * 4)
    assert "4 bytes are not 1 INT64" in refused.message


def test_a_bad_request_over_http_is_the_protocols_error_object(server, image):
    """The library's refusal of a field, as /v1 words it, in {"error": ...}."""
    body = {"inputs": [_pixels(image)], "parameters": {"strength": 1.5}}
    answer = httpx.post(f"{server.url}{INFER}", json=body, headers=KEY, timeout=60)
    assert answer.status_code == 422
    assert answer.json() == {"error": "strength must be in (0, 1], got 1.5"}
    answer = httpx.post(f"{server.url}/v2/models/sd15/infer", json=body, headers=KEY)
    assert answer.status_code == 404


def test_tritonclient_calls_the_server(server, image, tmp_path):
    """NVIDIA's client, in binary form both ways (its default), in its own process (it
    brings gevent): its output is /v1's image."""
    pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]'")
    (want,) = v1_images(server, image, {"prompt": "a bird", **SMALL})
    np.save(tmp_path / "image.npy", np.asarray(image))
    code = f"""
import numpy as np, tritonclient.http as http
client = http.InferenceServerClient("{server.url.removeprefix("http://")}")
headers = {{"Authorization": "Bearer secret"}}
assert client.is_server_ready() and client.is_model_ready("img2img")
meta = client.get_model_metadata("img2img", headers=headers)
assert meta["outputs"][0]["name"] == "image"
prompt = http.InferInput("prompt", [1], "BYTES")
prompt.set_data_from_numpy(np.array([b"a bird"], dtype=object))
picture = np.load("{tmp_path / "image.npy"}")
image = http.InferInput("image", list(picture.shape), "UINT8")
image.set_data_from_numpy(picture)
result = client.infer("img2img", [prompt, image], headers=headers,
                      outputs=[http.InferRequestedOutput("image")],
                      parameters={{"num_inference_steps": 4, "strength": 0.5, "seed": 3}})
np.save("{tmp_path / "out.npy"}", result.as_numpy("image"))
print(result.get_response()["parameters"]["unet_calls"])
"""
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["2"]
    got = np.load(tmp_path / "out.npy")
    assert got.shape == (1, 32, 48, 3) and np.array_equal(got[0], want)


def test_health_answers_while_an_inference_request_is_read(server, image):
    """A request's tensors are read off the event loop (JSON ones take long): held in the
    middle of reading one, /v2/health/live still answers."""
    from sdtrt.serve import kserve

    def live():
        assert httpx.get(f"{server.url}/v2/health/live", timeout=5).status_code == 200

    body = {"inputs": [_pixels(image)], "parameters": SMALL}
    answer = held_mid_call(
        kserve,
        "parse_infer",
        lambda: httpx.post(f"{server.url}{INFER}", json=body, headers=KEY, timeout=60),
        live,
    )
    assert answer.status_code == 200


def test_the_model_is_served_under_the_name_given(tiny, image):
    """``sdtrt serve --model-name sd15-img2img``: a KServe InferenceService's name in the
    paths and answers; another name is not this server's model."""
    from sdtrt.cli import build_parser

    args = build_parser().parse_args(["serve", "--model-name", "sd15-img2img"])
    assert args.model_name == "sd15-img2img"
    pipe = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    with serving(pipe, ServeOptions(model_name="sd15-img2img")) as running:
        url = f"{running.url}/v2/models/sd15-img2img"
        assert httpx.get(url).json()["name"] == "sd15-img2img"
        body = {"inputs": [_pixels(image)], "parameters": SMALL}
        answer = httpx.post(f"{url}/infer", json=body, timeout=60)
        assert answer.status_code == 200 and answer.json()["model_name"] == "sd15-img2img"
        assert httpx.post(f"{running.url}{INFER}", json=body).status_code == 404


def test_several_prompts_are_one_batch_of_the_seed(server, image):
    """prompt BYTES [2] with two images each: the pipeline's batch of 4 from the one seed,
    in its order, as /v1 answers the same list."""
    fields = {"prompt": ["a cat", "a dog"], "num_images_per_prompt": 2, **SMALL}
    body = {"image": base64.b64encode(png_bytes(image)).decode(), **fields}
    v1 = httpx.post(f"{server.url}/v1/img2img", json={**body, "response_format": "json"},
                    headers=KEY, timeout=60)  # fmt: skip
    assert v1.status_code == 200, v1.text
    png = httpx.post(f"{server.url}/v1/img2img", json=body, headers=KEY, timeout=60)
    assert png.status_code == 422 and "4 images come as JSON" in png.json()["error"]
    form = {k: str(v) for k, v in fields.items() if k != "prompt"}
    form.update(prompt=["a cat", "a dog"], response_format="json")
    multipart = httpx.post(f"{server.url}/v1/img2img", data=form, headers=KEY, timeout=60,
                           files={"image": ("in.png", png_bytes(image), "image/png")})  # fmt: skip
    assert multipart.status_code == 200, multipart.text
    assert multipart.json()["images"] == v1.json()["images"]  # -F prompt=a -F prompt=b
    pngs = [base64.b64decode(b) for b in v1.json()["images"]]
    want = [np.asarray(PIL.Image.open(io.BytesIO(png))) for png in pngs]
    prompts = {"name": "prompt", "datatype": "BYTES", "shape": [2], "data": ["a cat", "a dog"]}
    request = {"inputs": [prompts, _pixels(image)],
               "parameters": {"num_images_per_prompt": 2, **SMALL}}  # fmt: skip
    answer = httpx.post(f"{server.url}{INFER}", json=request, headers=KEY, timeout=60)
    assert answer.status_code == 200, answer.text
    (output,) = answer.json()["outputs"]
    got = np.asarray(output["data"], np.uint8).reshape(output["shape"])
    assert got.shape == (4, 32, 48, 3) and np.array_equal(got, np.stack(want))
