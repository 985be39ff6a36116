"""A1111's API on ``sdtrt serve`` (serve/a1111.py): ``webuiapi``, the A1111 web UI's most
used Python client, given the server's URL, gets from ``img2img`` the images
``/v1/img2img`` gives for the same fields, one seed per image as A1111 seeds a batch; what
sdtrt cannot do as asked is refused."""

from __future__ import annotations

import base64
import io
import json
import re
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import PIL.Image
import pytest
import webuiapi
from conftest import noise_picture, png_bytes, serving, v1_images

from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.serve.a1111 import CallProgress, scheduler_for
from sdtrt.serve.handling import BadRequest
from sdtrt.serve.options import ServeOptions

KEY = "secret"
SMALL = {"steps": 4, "denoising_strength": 0.5, "cfg_scale": 3.0, "width": 48, "height": 32}


@pytest.fixture(scope="module")
def image():
    return noise_picture(3)


@pytest.fixture(scope="module")
def server(pipe):
    with serving(pipe, ServeOptions(api_key=KEY, model_name="tiny-img2img")) as running:
        yield running


@pytest.fixture(scope="module")
def api(server):
    """The client as A1111's users make it: basic auth (A1111's --api-auth), the key as the
    password."""
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", username="me", password=KEY)


def _pixels(picture: PIL.Image.Image) -> np.ndarray:
    return np.asarray(picture.convert("RGB"))


def test_the_client_gets_v1s_images_one_seed_per_image(server, api, image):
    """batch_size 2, n_iter 2: four images, seeds 7 to 10 (A1111's seed + i), each the pixels
    /v1/img2img gives for its seed, sampler and numbers as sdtrt names them (to a level:
    batched otherwise); info says so."""
    result = api.img2img(
        images=[image], prompt="a red circle", negative_prompt="blue", sampler_name="DPM++ 2M",
        seed=7, batch_size=2, n_iter=2, **SMALL,
    )  # fmt: skip
    assert result.info["all_seeds"] == [7, 8, 9, 10] and result.info["seed"] == 7
    assert (result.info["width"], result.info["height"], result.info["steps"]) == (48, 32, 4)
    assert "Seed: 9, Size: 48x32" in result.info["infotexts"][2]
    assert result.parameters["init_images"] is None and result.parameters["seed"] == 7
    assert len(result.images) == 4
    for seed, got in zip((7, 8, 9, 10), result.images, strict=True):
        (want,) = v1_images(server, image, dict(
            prompt="a red circle", negative_prompt="blue", seed=seed,
            scheduler="dpmpp_2m_karras", num_inference_steps=4, strength=0.5,
            guidance_scale=3.0, width=48, height=32, eta=1.0,
        ))  # fmt: skip
        # The four ran as one batch of UNet rows, /v1's one at a time: sums in another order
        # (measured: one pixel value of 4608 a level off).
        difference = np.abs(_pixels(got).astype(int) - want)
        assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    assert np.abs(_pixels(result.images[0]).astype(int) - _pixels(result.images[1])).mean() > 10


def test_seed_minus_one_draws_a_new_one(api, image):
    first = api.img2img(images=[image], prompt="a cat", seed=-1, **SMALL)
    second = api.img2img(images=[image], prompt="a cat", seed=-1, **SMALL)
    assert first.info["seed"] != second.info["seed"]
    again = api.img2img(images=[image], prompt="a cat", seed=first.info["seed"], **SMALL)
    np.testing.assert_array_equal(_pixels(again.image), _pixels(first.image))


def test_what_clients_read_first(api):
    assert "Euler a" in api.util_get_sampler_names() and "DPM++ 2M" in api.util_get_sampler_names()
    assert api.util_get_scheduler_names() == ["automatic", "karras", "uniform"]
    assert api.util_get_model_names() == ["tiny-img2img"]
    assert api.util_get_current_model() == "tiny-img2img"
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    api.util_set_model("tiny-img2img")  # this server's: nothing to do, no error
    answer = api.session.post(f"{api.baseurl}/options", json={"sd_model_checkpoint": "sdxl"})
    assert answer.status_code == 422 and "one model" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"mask_image": PIL.Image.new("L", (48, 32))}, "inpainting"),
        ({"restore_faces": True}, "no face restoration"),
        ({"sampler_name": "Heun"}, "sampler 'Heun' is not here; taken: Euler a"),
        ({"sampler_name": "Euler", "scheduler": "Karras"}, "'Euler' on the karras schedule"),
        ({"override_settings": {"sd_model_checkpoint": "sdxl"}}, "this server has 'tiny-img2img'"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, "only sd_model_checkpoint"),
        ({"resize_mode": 3}, "resize_mode 3: taken: 0 (Just resize), 1 (Crop and resize)"),
        ({"batch_size": 0}, "batch_size and n_iter must be >= 1"),
        ({"denoising_strength": 2}, "strength"),  # the library's own message
        ({"prompt": "a cat <lora:ghibli:0.8>"}, "calls for <lora:ghibli:0.8>"),
        ({"negative_prompt": "<hypernet:x:1>"}, "switches no extra networks"),
    ],
)
def test_what_cannot_be_done_as_asked_is_refused(api, image, arguments, message):
    with pytest.raises(RuntimeError) as caught:  # the client's, with the status and body
        api.img2img(images=[image], **{"prompt": "a cat", **SMALL, **arguments})
    status, body = caught.value.args
    assert status == 422 and message in json.loads(body)["detail"]


def test_the_body_is_checked_before_any_job(server, image):
    auth = {"Authorization": f"Bearer {KEY}"}
    picture = base64.b64encode(png_bytes(image)).decode()
    for body, message in (
        ({"init_images": [picture, picture]}, "send one image (base64), got 2"),
        ({"init_images": [picture], "hr_scale": 2}, "unknown field(s) hr_scale"),
        ({"init_images": [picture], "batch_size": 10**6}, "at most"),
    ):
        answer = httpx.post(f"{server.url}/sdapi/v1/img2img", json=body, headers=auth)
        assert answer.status_code == 422 and message in answer.json()["detail"], answer.text
        assert set(answer.json()) == {"error", "detail", "body", "errors"}
    answer = httpx.post(f"{server.url}/sdapi/v1/img2img", content=b"{", headers=auth)
    assert answer.status_code == 400


def test_a_key_is_asked_for_as_a1111s_clients_send_it(server, image):
    """A1111's --api-auth is HTTP basic: the key as its password, any user name; Bearer and
    X-API-Key as on every route."""
    url = f"{server.url}/sdapi/v1/samplers"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, auth=("me", "wrong")).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Basic !!"}).status_code == 401
    assert httpx.get(url, auth=("anyone", KEY)).status_code == 200
    assert httpx.get(url, headers={"X-API-Key": KEY}).status_code == 200
    body = {"init_images": [base64.b64encode(png_bytes(image)).decode()], **SMALL}
    answer = httpx.post(f"{server.url}/sdapi/v1/img2img", json=body, auth=("me", "no"))
    assert answer.status_code == 401 and set(answer.json()) == {"error", "detail", "body", "errors"}


def test_send_images_and_include_init_images(server, image):
    picture = base64.b64encode(png_bytes(image)).decode()
    body = {"init_images": [picture], "send_images": False, "include_init_images": True, **SMALL}
    answer = httpx.post(f"{server.url}/sdapi/v1/img2img", json=body, auth=("me", KEY), timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["images"] == [] and answer.json()["parameters"]["init_images"] == [picture]


@pytest.mark.parametrize(
    ("sampler", "schedule", "ours"),
    [
        ("Euler a", "automatic", "euler_a"),
        ("k_euler_a", "Automatic", "euler_a"),
        ("DPM++ 2M", "automatic", "dpmpp_2m_karras"),  # A1111's default for it: Karras's
        ("DPM++ 2M", "Uniform", "dpmpp_2m"),
        ("DPM++ 2M Karras", "automatic", "dpmpp_2m_karras"),  # before A1111 1.9
        ("DPM++ 2M SDE", "automatic", "dpmpp_2m_sde_karras"),
        ("LMS", "karras", "lms_karras"),
        ("PLMS", "automatic", "pndm"),
        ("tcd", "automatic", "tcd"),  # sdtrt's own names pass
    ],
)
def test_samplers_map_to_sdtrts_schedulers(sampler, schedule, ours):
    assert scheduler_for(sampler, schedule) == ours


def test_an_unknown_schedule_is_refused():
    with pytest.raises(BadRequest, match="scheduler 'exponential': taken: automatic"):
        scheduler_for("DPM++ 2M SDE", "Exponential")


def test_the_readme_client_runs_against_a_server(server, image, tmp_path, monkeypatch):
    """README's example, as written but for the address, size and steps (A1111's default
    size is 512x512: slow for a test)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```py\n(.*?)```", readme, re.S) if "webuiapi" in b]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KEY", KEY)
    image.save("photo.png")
    code = (
        textwrap.dedent(block)
        .replace("http://localhost:8000", server.url)
        .replace("steps=30,", "steps=4, width=48, height=32,")
    )
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert [PIL.Image.open(f"cat-{seed}.png").size for seed in (7, 8)] == [(48, 32)] * 2


def test_progress_adds_up_the_calls_images():
    """Two images of 8 steps (after 0 steps, when queued, they tell no steps yet)."""
    progress = CallProgress(2)
    first, second = progress.hook(0), progress.hook(1)
    first(0, None)
    assert progress.answer(1)["progress"] == 0
    first(3, 8)
    second(1, 8)
    answer = progress.answer(1)
    assert answer["progress"] == 4 / 16 and answer["eta_relative"] > 0
    assert (answer["state"]["sampling_step"], answer["state"]["sampling_steps"]) == (3, 8)
    assert answer["state"]["job_count"] == 1 and answer["current_image"] is None


def test_progress_shows_a_call_in_flight(server, api, image):
    """/progress while a call of 100 steps runs (polled every 5 ms, 20 s at most): a share
    of its steps between 0 and 1; nothing once it has finished."""
    body = {"init_images": [base64.b64encode(png_bytes(image)).decode()], **SMALL,
            "steps": 100, "denoising_strength": 1.0}  # fmt: skip
    call = threading.Thread(  # a client of its own (the api's session is not thread-safe)
        target=httpx.post,
        args=(f"{server.url}/sdapi/v1/img2img",),
        kwargs={"json": body, "auth": ("me", KEY), "timeout": 60},
    )
    call.start()
    seen, deadline = [], time.monotonic() + 20
    while call.is_alive() and time.monotonic() < deadline:
        state = api.get_progress()
        if 0 < state["progress"] < 1:
            seen.append(state)
        time.sleep(0.005)
    call.join(timeout=60)
    assert seen, "no poll saw the call between its first and last step"
    assert all(s["state"]["job_count"] == 1 and s["state"]["sampling_steps"] == 100 for s in seen)
    assert all(s["current_image"] is None for s in seen)  # no live previews without a TAESD
    assert api.get_progress()["state"]["job_count"] == 0


def test_one_images_failure_is_the_calls_and_cancels_the_others(server, image):
    """batch_size 2 from the last seed there is: the second image's seed is out of range
    (422, the library's message); the first image's job is cancelled, not left running."""
    picture = base64.b64encode(png_bytes(image)).decode()
    body = {"init_images": [picture], **SMALL, "steps": 400, "denoising_strength": 1.0,
            "seed": 2**64 - 1, "batch_size": 2}  # fmt: skip
    calls = server.batcher.stats.unet_calls
    answer = httpx.post(f"{server.url}/sdapi/v1/img2img", json=body, auth=("me", KEY), timeout=60)
    assert answer.status_code == 422 and "seed" in answer.json()["detail"], answer.text
    deadline = time.monotonic() + 30
    while not server.batcher.idle and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.batcher.idle and server.batcher.stats.unet_calls - calls < 100  # not its 400


def test_resize_modes_are_a1111s(server, api, image):
    """A1111's 1 (Crop and resize) and 2 (Resize and fill) are /v1's crop and fill, exactly
    (one image each: batched alike); 0 stretches."""
    for mode, name in ((0, "default"), (1, "crop"), (2, "fill")):
        got = api.img2img(images=[image], prompt="a cat", seed=5, resize_mode=mode,
                          **{**SMALL, "width": 32})  # fmt: skip
        (want,) = v1_images(server, image, dict(prompt="a cat", seed=5, resize_mode=name,
                            width=32, height=32, num_inference_steps=4, strength=0.5,
                            guidance_scale=3.0, scheduler="euler_a", eta=1.0))  # fmt: skip
        np.testing.assert_array_equal(_pixels(got.image), want)


def test_prompts_are_read_with_a1111s_emphasis(server, api, image):
    """A weight of 1 is the plain prompt's image, exactly; (red:1.5) another one; BREAK, which
    would start a second 75-token chunk, is refused."""
    fields = {"seed": 5, **SMALL}

    def pixels(prompt):
        return _pixels(api.img2img(images=[image], prompt=prompt, **fields).image)

    (plain,) = v1_images(server, image, dict(prompt="a red circle", seed=5, num_inference_steps=4,
                         strength=0.5, guidance_scale=3.0, width=48, height=32,
                         scheduler="euler_a", eta=1.0))  # fmt: skip
    np.testing.assert_array_equal(pixels("(a red circle:1.0)"), plain)
    assert np.abs(pixels("a (red:1.5) circle").astype(int) - plain).mean() > 1
    with pytest.raises(RuntimeError) as caught:
        api.img2img(images=[image], prompt="a cat BREAK a dog", **fields)
    status, body = caught.value.args
    assert status == 422 and "BREAK starts another" in json.loads(body)["detail"]


def test_live_previews_come_with_a_taesd(tiny, image):
    """With --preview-vae, /progress carries the call's latest preview (A1111's every 10
    steps) as current_image, a PNG of the call's size; none with skip_current_image."""
    pipe = Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)
    options = ServeOptions(preview_vae="sdtrt/assets/tiny-taesd")
    with serving(pipe, options) as running:
        picture = base64.b64encode(png_bytes(image)).decode()
        body = {"init_images": [picture], **SMALL, "steps": 100, "denoising_strength": 1.0}
        url = f"{running.url}/sdapi/v1"
        call = threading.Thread(target=httpx.post, args=(f"{url}/img2img",),
                                kwargs={"json": body, "timeout": 60})  # fmt: skip
        call.start()
        previews, skipped, deadline = [], [], time.monotonic() + 20
        while call.is_alive() and time.monotonic() < deadline:
            state = httpx.get(f"{url}/progress").json()
            if state["current_image"]:
                previews.append(state["current_image"])
                skipped.append(httpx.get(f"{url}/progress?skip_current_image=true").json())
            time.sleep(0.005)
        call.join(timeout=60)
    assert previews, "no poll saw a live preview"
    picture = PIL.Image.open(io.BytesIO(base64.b64decode(previews[-1])))
    assert (picture.format, picture.size) == ("PNG", (48, 32))
    assert all(state["current_image"] is None for state in skipped)


@pytest.fixture(scope="module")
def one_at_a_time(pipe):
    """A server whose UNet calls take one guided image (2 rows): a call's second image waits
    for its first."""
    with serving(pipe, ServeOptions(max_rows=2)) as running:
        yield running


def _started_then(server, told: str, seed: int) -> tuple[dict, Any]:
    """A call of two images (100 steps each) from ``seed``; once its first image has taken a
    step (polled every 5 ms, 20 s at most), ``told`` as webuiapi tells it
    (``api.interrupt()``, ``api.skip()``): the call's answer and what ``told`` answered."""
    picture = base64.b64encode(png_bytes(noise_picture(4))).decode()
    body = {"init_images": [picture], **SMALL, "steps": 100, "denoising_strength": 1.0,
            "seed": seed, "batch_size": 2}  # fmt: skip
    url, answers = f"{server.url}/sdapi/v1", []
    call = threading.Thread(
        target=lambda: answers.append(httpx.post(f"{url}/img2img", json=body, timeout=60))
    )
    call.start()
    api = webuiapi.WebUIApi(baseurl=url)
    said, deadline = [], time.monotonic() + 20
    while call.is_alive() and time.monotonic() < deadline and not said:
        if api.get_progress()["state"]["sampling_step"] > 0:
            said.append(getattr(api, told)())
        time.sleep(0.005)
    call.join(timeout=60)
    assert said, "no poll saw the call's first image take a step"
    assert answers and answers[0].status_code == 200, answers
    return answers[0].json(), said[0]


def test_interrupt_ends_the_call_with_the_images_it_has_begun(one_at_a_time):
    """A1111's Interrupt while a call's first image runs: the call answers at once, that image
    at the steps it took (not the 100 steps' image), the second, not started, not made; the
    server is then idle."""
    calls = one_at_a_time.batcher.stats.unet_calls
    answer, said = _started_then(one_at_a_time, "interrupt", seed=11)
    assert said == {}
    info = json.loads(answer["info"])
    assert len(answer["images"]) == 1 and info["all_seeds"] == [11, 12]
    assert [text.split("Seed: ")[1].split(",")[0] for text in info["infotexts"]] == ["11"]
    assert one_at_a_time.batcher.idle and one_at_a_time.batcher.stats.unet_calls - calls < 100
    whole = v1_images(one_at_a_time, noise_picture(4), dict(
        prompt="", seed=11, num_inference_steps=100, strength=1.0, guidance_scale=3.0, width=48,
        height=32))  # fmt: skip
    got = np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))))
    assert np.abs(got.astype(int) - whole[0]).mean() > 1


def test_skip_ends_the_images_begun_and_runs_the_others(one_at_a_time):
    """A1111's Skip while a call's first image runs: that image ends at the steps it took;
    the second, not started, runs its 100 steps: /v1's image for its seed, exactly."""
    answer, said = _started_then(one_at_a_time, "skip", seed=21)
    assert said is None and len(answer["images"]) == 2
    pixels = [np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(png))))
              for png in answer["images"]]  # fmt: skip
    fields = dict(prompt="", num_inference_steps=100, strength=1.0, guidance_scale=3.0, width=48,
                  height=32)  # fmt: skip
    (first,) = v1_images(one_at_a_time, noise_picture(4), {**fields, "seed": 21})
    (second,) = v1_images(one_at_a_time, noise_picture(4), {**fields, "seed": 22})
    np.testing.assert_array_equal(pixels[1], second)
    assert np.abs(pixels[0].astype(int) - first).mean() > 1
