"""`sdtrt serve`'s HTTP API on the tiny model against a real server on loopback: JSON and
multipart requests answer the pipeline's images, /docs, errors and their statuses, the API
key, metrics, request ids, draining on SIGTERM, and `sdtrt bench-serve`."""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import PIL.Image
import pytest
from conftest import (
    free_port,
    held_mid_call,
    noise_picture,
    pipeline_reference,
    pipeline_reference_images,
    png_bytes,
    serving,
)

from sdtrt.errors import (
    InvalidInputError,
)
from sdtrt.runtime.inputs import DEFAULT_STRENGTH
from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.serve.app import create_app
from sdtrt.serve.batcher import StepBatcher
from sdtrt.serve.jobs import Img2ImgRequest
from sdtrt.serve.options import ServeOptions
from sdtrt.serve.server import BackgroundServer


@pytest.fixture(scope="module")
def image():
    return noise_picture(0)


@pytest.fixture(scope="module")
def server(pipe):
    with serving(pipe, ServeOptions(api_key="secret", max_body_mb=0.5)) as running:
        yield running


KEY = {"Authorization": "Bearer secret"}
SMALL = {"num_inference_steps": 4, "strength": 0.5, "seed": 3}


def test_json_and_multipart_answer_the_pipelinespng_bytes(tiny, server, image):
    body = {"prompt": "a cat", "image": base64.b64encode(png_bytes(image)).decode(), **SMALL}
    answer = httpx.post(f"{server.url}/v1/img2img", json=body, headers=KEY, timeout=60)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert answer.headers["x-unet-calls"] == "2" and answer.headers["x-seed"] == "3"
    got = np.asarray(PIL.Image.open(io.BytesIO(answer.content)))
    want = pipeline_reference(tiny, Img2ImgRequest(prompt="a cat", **SMALL), image)
    assert got.shape == (32, 48, 3)
    assert np.array_equal(got, np.round(want * 255).astype(np.uint8))  # diffusers' to-PIL
    form = {k: str(v) for k, v in {"prompt": "a cat", **SMALL}.items()}
    answer = httpx.post(
        f"{server.url}/v1/img2img",
        data={**form, "response_format": "json"},
        files={"image": ("in.png", png_bytes(image), "image/png")},
        headers=KEY,
        timeout=60,
    )
    assert answer.status_code == 200
    meta = answer.json()
    assert (meta["width"], meta["height"], meta["seed"], meta["unet_calls"]) == (48, 32, 3, 2)
    assert set(meta["timings_ms"]) >= {"text_encoder", "vae_encoder", "denoise", "vae_decoder"}
    assert meta["queue_wait_ms"] >= 0
    documented = _documented(server)["responses"]["200"]["content"]["application/json"]["schema"]
    assert set(meta) == set(documented["properties"])
    decoded = PIL.Image.open(io.BytesIO(base64.b64decode(meta["image"])))
    assert np.array_equal(np.asarray(decoded), got)


@pytest.mark.parametrize("mode", ["crop", "fill"])
def test_resize_mode_is_the_image_processors(server, image, mode):
    """A 48x32 picture to 32x32: with resize_mode crop or fill, the answer is the default
    (stretching) one's for the picture diffusers' image processor made of it in that mode
    first, exactly; not the stretched picture's."""
    from diffusers.image_processor import VaeImageProcessor

    def answer(picture, **fields):
        body = {"image": base64.b64encode(png_bytes(picture)).decode(), **SMALL, **fields}
        got = httpx.post(f"{server.url}/v1/img2img", json=body, headers=KEY, timeout=60)
        assert got.status_code == 200, got.text
        return np.asarray(PIL.Image.open(io.BytesIO(got.content)))

    made = VaeImageProcessor().resize(image, 32, 32, resize_mode=mode)
    assert made.size == (32, 32)
    moded = answer(image, height=32, width=32, resize_mode=mode)
    np.testing.assert_array_equal(moded, answer(made))
    assert np.abs(moded.astype(int) - answer(image, height=32, width=32)).mean() > 5


@pytest.mark.parametrize(
    "custom", [{"timesteps": (999, 850, 736, 645)}, {"sigmas": (14.615, 6.475, 3.861, 0.0)}]
)
def test_a_custom_schedule_over_json_and_a_form_is_the_pipelines_image(tiny, server, image, custom):
    """timesteps or sigmas per request, a JSON list or a form's "999,850,...": the
    pipeline's image on the same schedule (its steps, cut by the strength)."""
    request = Img2ImgRequest(prompt="a cat", scheduler="euler", strength=0.5, seed=3, **custom)
    want = np.round(pipeline_reference(tiny, request, image) * 255).astype(np.uint8)
    fields = {"prompt": "a cat", "scheduler": "euler", "strength": 0.5, "seed": 3}
    name, values = next(iter(custom.items()))
    body = {**fields, name: list(values), "image": base64.b64encode(png_bytes(image)).decode()}
    form = {**{k: str(v) for k, v in fields.items()}, name: ",".join(map(str, values))}
    for answer in (
        httpx.post(f"{server.url}/v1/img2img", json=body, headers=KEY, timeout=60),
        httpx.post(
            f"{server.url}/v1/img2img",
            data=form,
            files={"image": ("in.png", png_bytes(image), "image/png")},
            headers=KEY,
            timeout=60,
        ),
    ):
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-unet-calls"] == str(len(values) // 2 - (name == "sigmas"))
        assert np.array_equal(np.asarray(PIL.Image.open(io.BytesIO(answer.content))), want)


def test_a_guidance_cutoff_over_json_and_a_form_is_the_pipelines_image(tiny, server, image):
    """guidance_cutoff per request, a JSON number or a form's text: the pipeline's image
    with the cutoff callback."""
    request = Img2ImgRequest(prompt="a cat", strength=0.5, seed=3, guidance_cutoff=0.25)
    want = np.round(pipeline_reference(tiny, request, image) * 255).astype(np.uint8)
    fields = {"prompt": "a cat", "strength": 0.5, "seed": 3, "guidance_cutoff": 0.25}
    body = {**fields, "image": base64.b64encode(png_bytes(image)).decode()}
    for answer in (
        httpx.post(f"{server.url}/v1/img2img", json=body, headers=KEY, timeout=60),
        httpx.post(
            f"{server.url}/v1/img2img",
            data={k: str(v) for k, v in fields.items()},
            files={"image": ("in.png", png_bytes(image), "image/png")},
            headers=KEY,
            timeout=60,
        ),
    ):
        assert answer.status_code == 200, answer.text
        assert np.array_equal(np.asarray(PIL.Image.open(io.BytesIO(answer.content))), want)


def test_images_per_prompt_answer_as_a_json_list_of_the_pipelines_images(tiny, server, image):
    """num_images_per_prompt 2: the JSON answer's images are the pipeline's two (the first
    also as image); asked as a PNG, a 422 that says how to ask."""
    request = Img2ImgRequest(prompt="a cat", strength=0.5, seed=3, num_images_per_prompt=2)
    want = [
        np.round(a * 255).astype(np.uint8) for a in pipeline_reference_images(tiny, request, image)
    ]
    body = {"prompt": "a cat", "strength": 0.5, "seed": 3, "num_images_per_prompt": 2}
    body["image"] = base64.b64encode(png_bytes(image)).decode()
    url = f"{server.url}/v1/img2img"
    answer = httpx.post(url, json={**body, "response_format": "json"}, headers=KEY, timeout=60)
    assert answer.status_code == 200, answer.text
    meta = answer.json()
    assert len(meta["images"]) == 2 and meta["image"] == meta["images"][0]
    for png, expected in zip(meta["images"], want, strict=True):
        decoded = np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(png))))
        assert np.array_equal(decoded, expected)
    refused = httpx.post(url, json=body, headers=KEY, timeout=60)
    assert refused.status_code == 422
    assert "2 images come as JSON: send response_format json" in refused.json()["error"]


def test_an_answer_as_jpeg_or_webp_is_the_png_answer_within_their_loss(server, image):
    body = {"image": base64.b64encode(png_bytes(image)).decode(), **SMALL}
    url = f"{server.url}/v1/img2img"
    png = httpx.post(url, json=body, headers=KEY, timeout=60)
    want = np.asarray(PIL.Image.open(io.BytesIO(png.content)), dtype=np.float32)
    for kind in ("jpeg", "webp"):
        answer = httpx.post(url, json={**body, "response_format": kind}, headers=KEY, timeout=60)
        assert answer.status_code == 200 and answer.headers["content-type"] == f"image/{kind}"
        assert len(answer.content) < len(png.content)
        got = PIL.Image.open(io.BytesIO(answer.content))
        assert got.format == kind.upper() and got.size == (48, 32)
        error = np.abs(np.asarray(got.convert("RGB"), dtype=np.float32) - want)
        # mean error in 8-bit levels, measured: jpeg 3.1, webp 3.4 (a small, busy picture;
        # swapped channels or a wrong quality would be tens)
        assert float(error.mean()) < 6, kind
    refused = httpx.post(url, json={**body, "response_format": "gif"}, headers=KEY)
    assert refused.status_code == 422
    assert "one of png, jpeg, webp, json" in refused.json()["error"]


def test_a_multipart_upload_is_read_and_its_temporary_file_closed(image):
    """Starlette spools each uploaded file to a temporary file: the form is closed once its
    bytes are read, rather than left for the garbage collector (a ResourceWarning each)."""
    import asyncio
    import gc
    import warnings

    from starlette.requests import Request

    from sdtrt.serve.handling import read_form

    request = httpx.Request(
        "POST", "http://x/", data={"prompt": "a cat"}, files={"image": ("in.png", png_bytes(image))}
    )
    body, kind = request.read(), request.headers["content-type"]
    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", kind.encode())]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        form = asyncio.run(read_form(Request(scope), body))
        gc.collect()
    assert form == {"prompt": "a cat", "image": png_bytes(image)}
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def _documented(server):
    """What /docs shows of POST /v1/img2img (the app's OpenAPI document)."""
    return httpx.get(f"{server.url}/openapi.json").json()["paths"]["/v1/img2img"]["post"]


def test_the_documented_defaults_are_the_servers(server, image):
    """/docs lists every field the server takes, and a request that sends each documented
    default gets the image a request without them gets."""
    body = _documented(server)["requestBody"]["content"]["application/json"]
    fields = body["schema"]["properties"]
    taken = {field.name for field in dataclasses.fields(Img2ImgRequest)} - {"emphasis"}
    assert set(fields) == taken | {"response_format", "timeout", "priority", "preview_every"}
    # (emphasis is A1111's prompts' reading: its route sets it; /v1 reads plain text)
    defaults = {name: f["default"] for name, f in fields.items() if "default" in f}
    assert defaults["num_inference_steps"] == 50 and defaults["scheduler"] == "lms"
    picture = base64.b64encode(png_bytes(image)).decode()
    bare = httpx.post(f"{server.url}/v1/img2img", json={"image": picture}, headers=KEY, timeout=60)
    body = {"image": picture, **defaults, "strength": DEFAULT_STRENGTH}
    spelled = httpx.post(f"{server.url}/v1/img2img", json=body, headers=KEY, timeout=60)
    assert bare.status_code == spelled.status_code == 200
    assert bare.content == spelled.content and bare.headers["x-unet-calls"] == "40"


def test_a_server_answers_with_its_own_defaults(tiny, image):
    """`sdtrt serve --scheduler S --steps 4 --guidance 1 --strength 0.5` (an LCM-LoRA
    server's few unguided steps): the warm-up request runs the server's scheduler and
    guidance, a request that leaves those out gets them, as /docs says;
    one that names another scheduler gets that scheduler as the model configures it (it
    was made from the server's scheduler's config: dpmpp_2m came with the SDE solver and
    Karras sigmas of dpmpp_2m_sde_karras), and one that sends start_step is not given the
    default strength too."""
    scheduler = "dpmpp_2m_sde_karras"
    pipe = Img2ImgPipeline.from_components(tiny, "torch", scheduler, show_progress=False)
    options = ServeOptions(steps=4, guidance=1.0, strength=0.5)
    batcher = StepBatcher(pipe, options)
    rows: list[int] = []
    batcher.stats.on_unet_call.append(rows.append)
    app = create_app(batcher, options)
    picture = base64.b64encode(png_bytes(image)).decode()
    with BackgroundServer(app) as running:
        running.wait_ready()
        assert rows == [1, 1]  # the warm-up: 2 steps of the server's unguided row
        fields = _documented(running)["requestBody"]["content"]["application/json"]["schema"]
        documented = {k: v.get("default") for k, v in fields["properties"].items()}
        answers = [
            httpx.post(f"{running.url}/v1/img2img", json={"image": picture, **extra}, timeout=60)
            for extra in ({}, {"scheduler": "dpmpp_2m"}, {"start_step": 1})
        ]
    assert [documented[k] for k in ("scheduler", "num_inference_steps", "guidance_scale")] == [
        scheduler,
        4,
        1.0,
    ]
    assert documented["strength"] == 0.5
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.headers["x-unet-calls"] for a in answers] == ["2", "2", "3"]
    for answer, name in zip(answers[:2], (scheduler, "dpmpp_2m"), strict=True):
        request = Img2ImgRequest(
            scheduler=name, num_inference_steps=4, guidance_scale=1.0, strength=0.5
        )
        want = np.round(pipeline_reference(tiny, request, image) * 255).astype(np.uint8)
        assert np.array_equal(np.asarray(PIL.Image.open(io.BytesIO(answer.content))), want), name
    with pytest.raises(InvalidInputError, match="strength must be in"):
        ServeOptions(strength=1.5)
    with pytest.raises(InvalidInputError, match="steps"):
        ServeOptions(steps=0)


@pytest.mark.parametrize(
    "body, status, says",
    [
        (b"{not json", 400, "not valid JSON"),
        ({"image": base64.b64encode(b"hello").decode()}, 400, "not an image"),
        ({"image": "***"}, 400, "not valid base64"),
        ({"image": "https://example.com/a.png"}, 400, "image is a URL: this server fetches"),
        ({"strength": 1.5}, 422, "strength must be in (0, 1]"),
        ({"start_step": 50, "num_inference_steps": 50}, 422, "start step must be an integer"),
        ({"num_inference_steps": 5000}, 422, "over this machine's limit of 1000"),
        ({"height": 30, "width": 32}, 422, "not a multiple of 8 px"),
        ({"scheduler": "magic"}, 422, "expected one of lms"),
        ({"seed": -1}, 422, "seed must be an integer in [0, 2^64 - 1]"),
        ({"eta": 2}, 422, "eta must be a number in [0, 1]"),
        ({"steps": 5}, 422, "unknown field(s) steps; allowed: image, prompt"),
        ({"guidance_scale": "high"}, 422, "guidance_scale must be a number"),
        ({"image": "A" * 800_000}, 413, "over this server's limit"),
        ({"timesteps": [999, 500]}, 422, "LMSDiscreteScheduler takes no custom timesteps"),
        ({"timesteps": "999,x", "scheduler": "euler"}, 422, "timesteps: expected numbers"),
        ({"sigmas": [1, True], "scheduler": "euler"}, 422, "sigmas must be a list of numbers"),
        ({"timesteps": [500, 999], "scheduler": "euler"}, 422, "must be in descending order"),
        ({"guidance_cutoff": 1.5}, 422, "guidance cutoff must be a number in [0, 1], the share"),
        ({"guidance_cutoff": "half"}, 422, "guidance_cutoff must be a number"),
        ({"resize_mode": "zoom"}, 422, "resize_mode must be one of default, fill, crop"),
    ],
)
def test_bad_input_is_a_4xx_with_the_librarys_message(server, body, status, says):
    if isinstance(body, bytes):
        answer = httpx.post(
            f"{server.url}/v1/img2img",
            content=body,
            headers={**KEY, "content-type": "application/json"},
        )
    else:
        answer = httpx.post(f"{server.url}/v1/img2img", json=body, headers=KEY, timeout=30)
    assert answer.status_code == status, answer.text
    assert says in answer.json()["error"]


def test_an_oversized_image_is_refused_from_its_header(server, monkeypatch):
    monkeypatch.setenv("SDTRT_MAX_PIXELS", "1000")
    body = {"image": base64.b64encode(png_bytes(PIL.Image.new("RGB", (64, 64)))).decode()}
    answer = httpx.post(f"{server.url}/v1/img2img", json=body, headers=KEY)
    assert answer.status_code == 422 and "over this server's limit of 1000" in answer.text


def test_the_api_key_guards_v1_and_metrics_not_the_probes(server):
    assert httpx.post(f"{server.url}/v1/img2img", json=SMALL).status_code == 401
    wrong = {"X-API-Key": "guess"}
    assert httpx.post(f"{server.url}/v1/img2img", json=SMALL, headers=wrong).status_code == 401
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    assert httpx.get(f"{server.url}/health").json() == {"status": "alive", "pid": os.getpid()}
    assert httpx.get(f"{server.url}/ready").status_code == 200


def test_metrics_count_requests_rows_and_queue(server):
    httpx.post(f"{server.url}/v1/img2img", json={**SMALL, "strength": 2}, headers=KEY)
    httpx.post(f"{server.url}/v1/img2img", json=SMALL, headers=KEY, timeout=60)
    text = httpx.get(f"{server.url}/metrics", headers=KEY).text
    for line in (
        'sdtrt_requests_total{status="422"}',
        "sdtrt_unet_rows_per_call_count",
        "sdtrt_queue_depth 0.0",
        "sdtrt_active_jobs 0.0",
    ):
        assert line in text, line
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")
    answered = float(values['sdtrt_requests_total{status="200"}'])
    assert answered >= 1
    # every answered request is observed once in each histogram, stage by stage
    for name in (
        "sdtrt_request_latency_seconds_count",
        "sdtrt_queue_wait_seconds_count",
        *(
            f'sdtrt_stage_seconds_count{{stage="{stage}"}}'
            for stage in ("text_encoder", "vae_encoder", "denoise", "vae_decoder")
        ),
    ):
        assert float(values[name]) == answered, name
    # Images are counted apart from requests: one request of two images adds two.
    body = {**SMALL, "num_images_per_prompt": 2, "response_format": "json"}
    assert httpx.post(f"{server.url}/v1/img2img", json=body, headers=KEY, timeout=60).is_success
    text = httpx.get(f"{server.url}/metrics", headers=KEY).text
    after = dict(line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")
    assert float(after['sdtrt_requests_total{status="200"}']) == answered + 1
    assert float(after["sdtrt_images_total"]) == float(values["sdtrt_images_total"]) + 2


def test_every_answer_carries_its_request_id(server):
    url = f"{server.url}/v1/img2img"
    given = {**KEY, "X-Request-ID": "trace-7f3a"}
    assert httpx.post(url, json=SMALL, headers=given, timeout=60).headers["x-request-id"] == (
        "trace-7f3a"
    )
    made = [
        httpx.post(url, json={"strength": 2}, headers=headers).headers["x-request-id"]
        for headers in (KEY, KEY, {**KEY, "X-Request-ID": "x" * 200})
    ]
    assert all(re.fullmatch("[0-9a-f]{32}", made_id) for made_id in made)
    assert len(set(made)) == 3


def test_an_unforeseen_error_is_a_counted_json_500(server, monkeypatch):
    batcher = server.server.sdtrt_app.state.batcher

    def prepare(request, timeout=None, priority=0):
        raise ValueError("something nobody checked")

    monkeypatch.setattr(batcher, "prepare", prepare)
    answer = httpx.post(f"{server.url}/v1/img2img", json=SMALL, headers=KEY, timeout=30)
    assert answer.status_code == 500
    assert answer.json() == {"error": "ValueError: something nobody checked"}
    assert (
        'sdtrt_requests_total{status="500"}' in httpx.get(f"{server.url}/metrics", headers=KEY).text
    )
    monkeypatch.undo()
    assert httpx.post(f"{server.url}/v1/img2img", json=SMALL, headers=KEY, timeout=60).is_success


def test_a_full_queue_is_429_with_retry_after(pipe):
    options = ServeOptions(max_queue=1)
    batcher = StepBatcher(pipe, options, start=False)  # what waits stays waiting
    batcher.submit(batcher.prepare(Img2ImgRequest(**SMALL)))
    app = create_app(batcher, options, warmup=False)
    with BackgroundServer(app) as running:
        answer = httpx.post(f"{running.url}/v1/img2img", json=SMALL)
        assert answer.status_code == 429 and answer.headers["retry-after"] == "1"
        assert "queue is full (1 requests waiting)" in answer.json()["error"]
    batcher.close()


@pytest.mark.parametrize(
    "args, says",
    [
        (["--max-queue", "0"], "max_queue must be an integer >= 1, got 0"),
        (["--port", "65536"], "port must be in [0, 65535], got 65536"),
        (["--timeout", "0"], "timeout must be > 0, got 0.0"),
        (["--max-body-mb", "0"], "max_body_mb must be > 0, got 0.0"),
        (["--guidance-cutoff", "1.5"], "guidance cutoff must be a number in [0, 1]"),
        (["--model-name", "sd/15"], "model name must be letters, digits, '_', '.' and '-'"),
    ],
)
def test_serve_settings_that_could_serve_nothing_are_refused_before_loading(
    capsys, monkeypatch, args, says
):
    from sdtrt.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("sdtrt.serve.server.run", no_loading)
    assert main(["serve", *args]) == 2
    assert says in capsys.readouterr().err


def test_only_a_server_open_to_other_machines_without_a_key_is_warned_about(caplog):
    from sdtrt.serve.server import bound_socket, warn_if_open

    said = []
    for host, key in [
        ("127.0.0.1", None),
        ("localhost", None),
        ("127.0.0.2", None),  # loopback too, as all of 127.0.0.0/8
        ("0.0.0.0", "k"),
        ("0.0.0.0", None),
    ]:
        caplog.clear()
        with bound_socket(host, 0) as sock:
            warn_if_open(sock, key)
        said += [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == ["listening on 0.0.0.0 without --api-key: anyone who reaches it may use it"]


def test_a_port_in_use_is_said_before_the_model_loads(capsys, monkeypatch):
    """The second `sdtrt serve` on a port loaded its model (minutes for SD, with an export
    or a build) and only then failed to bind: uvicorn's "address already in use", exit 3."""
    import socket

    from sdtrt.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("sdtrt.api.build_pipeline", no_loading)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sdtrt: error: cannot listen on 127.0.0.1 port {port}: Address already in use "
        "(another server is there): choose another --port"
    )


@pytest.mark.parametrize("step", ["decode_image", "encode_answer"])
def test_health_answers_while_a_requests_image_is_decoded_or_encoded(server, image, step):
    """Decoding, preprocessing and PNG encoding run off the event loop: held in the middle
    of one of them, a request does not hold up /health (on the loop, it would wait)."""
    from sdtrt.serve import app as serve_app

    body = {"image": base64.b64encode(png_bytes(image)).decode(), **SMALL}
    answer = held_mid_call(
        serve_app,
        step,
        lambda: httpx.post(f"{server.url}/v1/img2img", json=body, headers=KEY, timeout=60),
        lambda: _answers(f"{server.url}/health"),
    )
    assert answer.status_code == 200 and answer.headers["x-unet-calls"] == "2"


def _answers(url):
    assert httpx.get(url, timeout=5).status_code == 200


def test_a_late_request_is_504_and_a_client_that_leaves_cancels_its_job(server):
    slow = {"num_inference_steps": 400, "strength": 1.0, "height": 64, "width": 64}
    answer = httpx.post(
        f"{server.url}/v1/img2img", json={**slow, "timeout": 0.3}, headers=KEY, timeout=60
    )
    assert answer.status_code == 504 and "deadline" in answer.json()["error"]
    batcher = server.server.sdtrt_app.state.batcher
    calls = batcher.stats.unet_calls
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/img2img", json=slow, headers=KEY, timeout=0.5)
    deadline = time.monotonic() + 20
    while not batcher.idle and time.monotonic() < deadline:
        time.sleep(0.02)
    assert batcher.idle  # the job went with its client
    assert batcher.stats.unet_calls - calls < 400


def test_sdtrt_serve_drains_on_sigterm_and_exits_0(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SDTRT_API_KEY": "k"}
    command = ["serve", "--port", str(port), "--drain-timeout", "60", "--model-name", "tiny"]
    process = subprocess.Popen(
        [sys.executable, "-m", "sdtrt.cli", *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "never ready"
            time.sleep(0.2)
        answers = []
        body = {"num_inference_steps": 40, "strength": 1.0, "height": 32, "width": 32}
        client = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"{url}/v1/img2img", json=body, headers={"X-API-Key": "k"}, timeout=120)
            )
        )
        client.start()
        time.sleep(0.5)  # in flight
        process.send_signal(signal.SIGTERM)
        client.join(timeout=120)
        assert process.wait(timeout=120) == 0
        (answer,) = answers
        assert answer.status_code == 200 and answer.headers["x-unet-calls"] == "40"
    finally:
        if process.poll() is None:
            process.kill()
        with process:  # closes its pipe
            log = process.stdout.read() if process.stdout else ""
    assert "draining" in log
    assert "/v2/models/tiny/infer" in log  # the start line names the served paths


def test_bench_serve_compares_the_three_policies_over_loopback(tmp_path, capsys):
    import json

    from sdtrt.cli import main

    record, picture = tmp_path / "load.json", tmp_path / "load.png"
    args = ["bench-serve", "--rates", "20", "--requests", "4", "--steps", "4"]
    args += ["--sizes", "32x48,32x32", "--json", str(record), "--plot", str(picture)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| policy | offered req/s |" in out and "step/single throughput" in out
    rows = json.loads(record.read_text())["results"]
    assert [r["policy"] for r in rows] == ["single", "request", "step"]
    for row in rows:
        assert row["ok"] == row["requests"] == 4 and row["errors"] == 0
        assert row["throughput_rps"] > 0 and row["latency_ms"]["p99"] >= row["latency_ms"]["p50"]
    single = next(r for r in rows if r["policy"] == "single")
    assert single["rows_per_call"] == 2.0  # one guided request per call
    assert picture.stat().st_size > 10_000


def test_bench_serve_drives_a_keyed_server_with_its_key_or_says_why_not(server, monkeypatch):
    """`bench-serve --url` against a server with an API key sent no key: every request of
    the run was a 401, reported as a result (ok 0, latencies NaN). The key now comes from
    $SDTRT_API_KEY, as the server's does, and the server is checked before the load."""
    from sdtrt.serve.loadgen import LoadConfig, run_load_bench

    config = LoadConfig(rates=(20.0,), requests=3, steps=4, sizes=((32, 32),))
    monkeypatch.delenv("SDTRT_API_KEY", raising=False)
    with pytest.raises(InvalidInputError, match="asks for an API key; set SDTRT_API_KEY"):
        run_load_bench("tiny", "torch", config, url=server.url)
    monkeypatch.setenv("SDTRT_API_KEY", "guess")
    with pytest.raises(InvalidInputError, match=r"refused the key in \$SDTRT_API_KEY"):
        run_load_bench("tiny", "torch", config, url=server.url)
    nobody = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(InvalidInputError, match="no sdtrt server answers there"):
        run_load_bench("tiny", "torch", config, url=nobody)
    monkeypatch.setenv("SDTRT_API_KEY", "secret")
    (row,) = run_load_bench("tiny", "torch", config, url=server.url)["results"]
    assert row["ok"] == row["requests"] == 3 and row["errors"] == 0
    # Each request names the load's scheduler: LCM-LoRA's load of a few unguided steps
    # runs, and past LCM's 50 distilled steps the server refuses every request (422).
    lcm = dataclasses.replace(config, scheduler="lcm", guidance=1.0)
    (row,) = run_load_bench("tiny", "torch", lcm, url=server.url)["results"]
    assert row["ok"] == 3 and row["errors"] == 0
    too_many = dataclasses.replace(lcm, steps=51)
    (row,) = run_load_bench("tiny", "torch", too_many, url=server.url)["results"]
    assert row["ok"] == 0 and row["errors"] == 3
    with pytest.raises(InvalidInputError, match="scheduler must be one of lms, .*, got 'heun'"):
        LoadConfig(scheduler="heun")


def test_bench_serve_sends_each_request_its_guidance_cutoff():
    """`bench-serve --guidance-cutoff 0.25`: each request of 4 steps at strength 1 is guided
    for 2 of them (int(4 x 0.25) = 1, and the step before), one at a time: 8 calls of 2,
    2, 1, 1 rows."""
    from sdtrt.serve.loadgen import LoadConfig, run_load_bench

    config = LoadConfig(rates=(20.0,), requests=2, steps=4, strength=(1.0, 1.0),
                        sizes=((32, 32),), policies=("single",), guidance_cutoff=0.25)  # fmt: skip
    (row,) = run_load_bench("tiny", "torch", config)["results"]
    assert row["ok"] == row["requests"] == 2 and row["errors"] == 0
    assert row["unet_calls"] == 8 and row["rows_per_call"] == 1.5


def test_bench_serve_refuses_bad_settings_before_loading(capsys):
    from sdtrt.cli import main

    for args, says in (
        (["--policies", "fifo"], "policies must be some of"),
        (["--rates", "0"], "rates must be positive"),
        (["--strength", "0.5-1.5"], "strength range"),
        (["--sizes", "32"], "--sizes: HxW"),
        (["--max-rows", "1"], "max rows must be >= 2"),
        (["--intra-op-threads", "0"], "intra-op threads must be an integer >= 1, got 0"),
        (["--intra-op-threads", "two"], "--intra-op-threads: an integer >= 1 or auto"),
        (["--guidance-cutoff", "2"], "guidance cutoff must be a number in [0, 1]"),
    ):
        assert main(["bench-serve", *args]) == 2
        assert says in capsys.readouterr().err
    # sdtrt serve's warm-up sizes: their form here, their unit once the model is loaded
    # (test_warm_up_sizes_are_checked_when_the_server_starts).
    assert main(["serve", "--warmup-sizes", "512"]) == 2
    assert "--warmup-sizes: HxW,HxW (e.g. 512x768), got '512'" in capsys.readouterr().err


def test_cors_lets_the_named_origins_call_from_a_browser(pipe, image):
    """--cors-origins: a preflight from a named origin is answered with its permissions, an
    answer to it carries the origin and exposes X-Seed; another origin gets none, nor does
    any without the option."""
    from sdtrt.cli import build_parser

    assert build_parser().parse_args(["serve", "--cors-origins", "a"]).cors_origins == "a"
    ui, other = "https://ui.example.com", "https://elsewhere.example.com"
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    body = {"image": base64.b64encode(png_bytes(image)).decode(), "num_inference_steps": 2}
    options = ServeOptions(cors_origins=f"{ui}, http://localhost:3000")
    assert options.cors_origins == (ui, "http://localhost:3000")
    with serving(pipe, options) as running:
        url = f"{running.url}/v1/img2img"
        allowed = httpx.options(url, headers={"Origin": ui, **preflight})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ui
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        answer = httpx.post(url, json=body, headers={"Origin": ui}, timeout=60)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ui
        assert "X-Seed" in answer.headers["access-control-expose-headers"]
        refused = httpx.options(url, headers={"Origin": other, **preflight})
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers
        answer = httpx.post(url, json=body, headers={"Origin": other}, timeout=60)
        assert "access-control-allow-origin" not in answer.headers
    with serving(pipe, ServeOptions()) as running:
        answer = httpx.post(f"{running.url}/v1/img2img", json=body, headers={"Origin": ui})
        assert "access-control-allow-origin" not in answer.headers


@pytest.mark.parametrize("origin", ["ui.example.com", "https://ui.example.com/app", "", 3])
def test_cors_origins_are_origins(origin):
    with pytest.raises(InvalidInputError, match="CORS origins are scheme://host"):
        ServeOptions(cors_origins=(origin,))
