"""``POST /v1/img2img/stream``: a request's progress as server-sent events, then /v1's JSON
answer; refusals before the job is queued answered as /v1 answers them; a failure after it
an error event; a client that leaves mid-stream cancels its job."""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest
import torch
from conftest import noise_picture, png_bytes

from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.serve.app import create_app
from sdtrt.serve.batcher import StepBatcher
from sdtrt.serve.options import ServeOptions
from sdtrt.serve.server import BackgroundServer

KEY = {"Authorization": "Bearer secret"}


@pytest.fixture(scope="module")
def server(tiny):
    pipe = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    options = ServeOptions(api_key="secret")
    app = create_app(StepBatcher(pipe, options), options)
    with BackgroundServer(app) as running:
        running.wait_ready()
        running.batcher = app.state.batcher
        yield running


@pytest.fixture(scope="module")
def body():
    picture = base64.b64encode(png_bytes(noise_picture(4))).decode()
    return {"image": picture, "prompt": "a cat", "num_inference_steps": 8, "strength": 0.5,
            "seed": 11}  # fmt: skip


def _events(lines):
    """(event, data) pairs of a server-sent event stream's lines."""
    out, name = [], None
    for line in lines:
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            out.append((name, json.loads(line[len("data: ") :])))
    return out


def test_a_stream_says_each_step_then_gives_the_json_answer(server, body):
    want = httpx.post(f"{server.url}/v1/img2img", json={**body, "response_format": "json"},
                      headers=KEY, timeout=60).json()  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/img2img/stream", json=body, headers=KEY,
                      timeout=60) as answer:  # fmt: skip
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        assert answer.headers["x-request-id"]
        events = _events(answer.iter_lines())
    names = [name for name, _ in events]
    assert names == ["queued", "step", "step", "step", "step", "result"]  # int(8 x 0.5) calls
    assert [data for name, data in events if name == "step"] == [
        {"step": i, "steps": 4} for i in range(1, 5)
    ]
    result = events[-1][1]
    assert result["images"] == want["images"] and result["unet_calls"] == 4
    assert (result["seed"], result["width"], result["height"]) == (11, 48, 32)


def test_refusals_before_the_job_is_queued_are_plain_answers(server, body):
    url = f"{server.url}/v1/img2img/stream"
    answer = httpx.post(url, json={**body, "strength": 1.5}, headers=KEY, timeout=60)
    assert answer.status_code == 422
    assert answer.json() == {"error": "strength must be in (0, 1], got 1.5"}
    answer = httpx.post(url, json={**body, "response_format": "jpeg"}, headers=KEY, timeout=60)
    assert answer.status_code == 422 and "a stream's result is the JSON answer" in answer.text
    assert httpx.post(url, json=body, timeout=60).status_code == 401


def test_a_failure_after_it_was_queued_is_an_error_event(server, body, monkeypatch):
    backend = server.batcher.backend
    monkeypatch.setattr(backend, "decode_latents", lambda latents: torch.full(
        (len(latents), 3, 32, 48), float("nan")))  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/img2img/stream", json=body, headers=KEY,
                      timeout=60) as answer:  # fmt: skip
        events = _events(answer.iter_lines())
    name, data = events[-1]
    assert name == "error" and data["status"] == 500
    assert data["error"].startswith("NonFiniteOutputError")
    assert [n for n, _ in events[:-1]] == ["queued"] + ["step"] * 4


def test_a_client_that_leaves_mid_stream_cancels_its_job(server, body):
    batcher = server.batcher
    long = {**body, "num_inference_steps": 1000, "strength": 1.0}
    with httpx.stream("POST", f"{server.url}/v1/img2img/stream", json=long, headers=KEY,
                      timeout=60) as answer:  # fmt: skip
        lines = answer.iter_lines()
        while next(lines) != "event: step":
            pass
        (job,) = batcher.active
    deadline = time.monotonic() + 30
    while not batcher.idle and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.cancelled and batcher.idle
    assert job.index < len(job.timesteps)  # dropped mid-way
