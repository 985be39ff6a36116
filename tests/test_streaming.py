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
from conftest import noise_picture, png_bytes, serving

from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.serve.batcher import StepBatcher
from sdtrt.serve.options import ServeOptions

KEY = {"Authorization": "Bearer secret"}


@pytest.fixture(scope="module")
def server(tiny):
    pipe = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    with serving(pipe, ServeOptions(api_key="secret")) as running:
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


def _euler_estimates(tiny, image, steps=12, strength=0.5, seed=11):
    """x0 of each step (1 the first) of the pipeline's own Euler run, from its latents
    before and after the step (the scheduler keeps no x0), and that run's pipeline."""
    pipe = Img2ImgPipeline.from_components(tiny, scheduler="euler", show_progress=False)
    after = []  # the latents after each step

    def record(pipeline, i, t, tensors):
        after.append(tensors["latents"].clone())
        return tensors

    pipe(prompt="a cat", image=image, num_inference_steps=steps, strength=strength,
         generator=torch.Generator().manual_seed(seed), callback_on_step_end=record)  # fmt: skip
    run = len(after)
    sigmas = pipe.scheduler.sigmas[steps - run :]
    estimates = {}
    for k in range(2, run + 1):
        before, later = after[k - 2], after[k - 1]
        estimates[k] = before - sigmas[k - 1] * (later - before) / (sigmas[k] - sigmas[k - 1])
    return pipe, estimates, after


def test_previews_show_each_steps_estimate_of_the_finished_image(server, tiny, body):
    """preview_every 2 of 6 steps: a preview after steps 2 and 4 (not 6: the result shows
    it), each the VAE's decoding of the step's x0, which for Euler is computed here from
    the pipeline's own latents before and after the step (a JPEG, as the server encodes it)."""
    import io

    import numpy as np
    import PIL.Image

    from sdtrt.serve.handling import encoded_images

    fields = {**body, "num_inference_steps": 12, "scheduler": "euler"}
    with httpx.stream("POST", f"{server.url}/v1/img2img/stream", headers=KEY, timeout=60,
                      json={**fields, "preview_every": 2}) as answer:  # fmt: skip
        events = _events(answer.iter_lines())
    names = [name if name != "step" else data["step"] for name, data in events]
    assert names == ["queued", 1, 2, "preview", 3, 4, "preview", 5, 6, "result"]
    previews = [data for name, data in events if name == "preview"]
    assert [(p["step"], p["steps"], len(p["images"])) for p in previews] == [(2, 6, 1), (4, 6, 1)]

    image = PIL.Image.open(io.BytesIO(base64.b64decode(body["image"])))
    pipe, estimates, after = _euler_estimates(tiny, image)
    for preview in previews:
        k = preview["step"]
        decoded = pipe.backend.decode_latents(estimates[k] / pipe.scaling_factor)
        (jpeg,) = encoded_images(pipe.image_processor.postprocess(decoded, "pil"), "jpeg")
        want = np.asarray(PIL.Image.open(io.BytesIO(jpeg)))
        got = np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(preview["images"][0]))))
        assert got.shape == want.shape == (32, 48, 3)
        assert np.abs(got.astype(int) - want).mean() < 0.5  # measured: 0.0
        noisy = pipe.backend.decode_latents(after[k - 1] / pipe.scaling_factor)  # not the latents
        plain = np.asarray(pipe.image_processor.postprocess(noisy, output_type="pil")[0])
        assert np.abs(got.astype(int) - plain).mean() > 10


def test_a_preview_vae_decodes_the_previews(tiny):
    """ServeOptions.preview_vae (--preview-vae): the previews are that TAESD's decoding of
    each step's x0 (the tiny model's own TAESD here), not the model VAE's."""
    import numpy as np

    from sdtrt.adapters import load_preview_vae
    from sdtrt.serve.jobs import Img2ImgRequest

    image = noise_picture(4)
    pipe, estimates, _ = _euler_estimates(tiny, image)
    taesd = load_preview_vae("sdtrt/assets/tiny-taesd", 4, 8)
    got: dict[str, dict[int, np.ndarray]] = {}
    vae_decoded: list[torch.Tensor] = []
    for decoder in ("sdtrt/assets/tiny-taesd", None):
        serving = Img2ImgPipeline.from_components(tiny, scheduler="euler", show_progress=False)
        if decoder is None:
            decode = serving.backend.decode_latents

            def recorded(latents, decode=decode):
                vae_decoded.append(decode(latents))
                return vae_decoded[-1]

            serving.backend.decode_latents = recorded
        batcher = StepBatcher(serving, ServeOptions(preview_vae=decoder))
        request = Img2ImgRequest(image=image, prompt="a cat", num_inference_steps=12,
                                 strength=0.5, seed=11, scheduler="euler")  # fmt: skip
        job = batcher.prepare(request)
        previews: dict[int, np.ndarray] = {}

        def told(done, steps, images=None, into=previews):
            if images:
                into[done] = np.asarray(images[0])

        job.progress = told
        job.preview_steps = frozenset({2, 5})
        batcher.submit(job).result(timeout=60)
        batcher.close()
        got[str(decoder)] = previews
    assert sorted(got["sdtrt/assets/tiny-taesd"]) == [2, 5]
    for k, preview in got["sdtrt/assets/tiny-taesd"].items():
        with torch.inference_mode():
            decoded = taesd.decode(estimates[k], return_dict=False)[0]  # its scaling factor: 1
        want = np.asarray(pipe.image_processor.postprocess(decoded, output_type="pil")[0])
        assert np.abs(preview.astype(int) - want).max() <= 1
        assert np.abs(preview.astype(int) - got["None"][k]).mean() > 1  # not the model VAE's
    # The model VAE's previews: diffusers' pictures of what it decoded, exactly (the worker
    # rounds to 8 bits on the device, as numpy_to_pil does on the host).
    for k, decoded in zip((2, 5), vae_decoded, strict=False):  # the last: the result's
        want = np.asarray(pipe.image_processor.postprocess(decoded, output_type="pil")[0])
        np.testing.assert_array_equal(got["None"][k], want)


def test_a_preview_outlives_another_jobs_failure_in_its_step(tiny):
    """Two jobs in one UNet call; the second's scheduler update fails after the first has
    taken its step (no step was queued then): the first still gets its preview and its
    image, the second fails alone."""
    from sdtrt.serve.jobs import Img2ImgRequest

    pipe = Img2ImgPipeline.from_components(tiny, scheduler="euler", show_progress=False)
    batcher = StepBatcher(pipe, start=False)
    request = Img2ImgRequest(image=noise_picture(4), num_inference_steps=4, strength=1.0,
                             scheduler="euler")  # fmt: skip
    first, second = batcher.prepare(request), batcher.prepare(request)
    told: list[int] = []
    first.progress = lambda done, steps, images=None: images and told.append(done)
    first.preview_steps = frozenset({2})
    step = second.scheduler.step

    def fails_at_the_second(*args, **kwargs):
        if second.index == 1:
            raise RuntimeError("a scheduler update failed")
        return step(*args, **kwargs)

    second.scheduler.step = fails_at_the_second
    futures = [batcher.submit(first), batcher.submit(second)]
    batcher.start()
    try:
        assert futures[0].result(timeout=60).unet_calls == 4
        with pytest.raises(RuntimeError, match="a scheduler update failed"):
            futures[1].result(timeout=60)
    finally:
        batcher.close()
    assert told == [2]


def test_a_preview_vae_must_be_a_taesd_for_the_model(tiny, tmp_path):
    from sdtrt.adapters import load_preview_vae
    from sdtrt.errors import InvalidInputError, ModelNotFoundError

    tiny["vae"].save_pretrained(tmp_path / "kl")
    with pytest.raises(InvalidInputError, match="is AutoencoderKL, not a TAESD"):
        load_preview_vae(str(tmp_path / "kl"), 4, 8)
    with pytest.raises(InvalidInputError, match="a TAESD made for another model"):
        load_preview_vae("sdtrt/assets/tiny-taesd", 16, 8)
    with pytest.raises(ModelNotFoundError, match="is not a folder"):
        load_preview_vae(str(tmp_path / "none"), 4, 8)
    with pytest.raises(ModelNotFoundError, match="is not a folder"):
        ServeOptions(preview_vae=str(tmp_path / "none"))  # before any model loads


def test_the_command_line_takes_a_preview_vae(tmp_path, capsys):
    from sdtrt.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--preview-vae", "sdtrt/assets/tiny-taesd"])
    assert args.preview_vae == "sdtrt/assets/tiny-taesd" and ServeOptions().preview_vae is None
    assert main(["serve", "--preview-vae", str(tmp_path / "none")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_preview_every_is_for_the_stream(server, body):
    answer = httpx.post(f"{server.url}/v1/img2img", json={**body, "preview_every": 2},
                        headers=KEY, timeout=60)  # fmt: skip
    assert answer.status_code == 422 and "POST /v1/img2img/stream" in answer.json()["error"]
    answer = httpx.post(f"{server.url}/v1/img2img/stream", json={**body, "preview_every": -1},
                        headers=KEY, timeout=60)  # fmt: skip
    assert answer.status_code == 422 and "preview_every must be an integer >= 0" in answer.text
