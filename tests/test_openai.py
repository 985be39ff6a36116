"""OpenAI's Images API on ``sdtrt serve`` (serve/openai_images.py): OpenAI's own SDK, given
the server's URL, gets from ``images.edit`` the images ``/v1/img2img`` gives for the same
fields; what sdtrt cannot do as asked is refused in OpenAI's error object."""

from __future__ import annotations

import base64
import io
import re
import textwrap
from pathlib import Path

import httpx
import numpy as np
import openai
import PIL.Image
import pytest
import torch
from conftest import noise_picture, png_bytes, serving, v1_images

from sdtrt.serve.openai_images import read_edit
from sdtrt.serve.options import ServeOptions

KEY = "secret"
SMALL = {"num_inference_steps": 4, "strength": 0.5, "seed": 3}


@pytest.fixture(scope="module")
def image():
    return noise_picture(2)


@pytest.fixture(scope="module")
def server(pipe):
    with serving(pipe, ServeOptions(api_key=KEY, model_name="tiny-img2img")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _pixels(encoded: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"))


def test_the_sdk_gets_the_images_v1_gives(server, client, image):
    """n images at a size (WIDTHxHEIGHT), sdtrt's own fields in extra_body: the pixels of
    /v1/img2img's answer for num_images_per_prompt, height and width, exactly."""
    result = client.images.edit(
        model="tiny-img2img",
        image=("picture.png", png_bytes(image), "image/png"),
        prompt="a red circle on a blue background",
        n=2,
        size="32x48",
        extra_body={**SMALL, "guidance_scale": 3},
    )
    assert [len(result.data or [])] == [2] and result.size == "32x48"
    assert result.output_format == "png" and result.background == "opaque"
    fields = {**SMALL, "guidance_scale": 3, "num_images_per_prompt": 2, "width": 32, "height": 48}
    expected = v1_images(server, image, {"prompt": "a red circle on a blue background", **fields})
    got = [_pixels(item.b64_json or "") for item in result.data or []]
    assert got[0].shape == (48, 32, 3)
    for mine, theirs in zip(got, expected, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert not np.array_equal(got[0], got[1])  # two draws, not one image twice


def test_each_edit_draws_its_own_seed_unless_given_one(server, image):
    """As OpenAI's API does, each call makes a new image; the X-Seed header names its seed,
    and sending that seed makes the same image again."""
    files = {"image": ("p.png", png_bytes(image), "image/png")}
    auth = {"Authorization": f"Bearer {KEY}"}
    form = {"prompt": "a cat", "num_inference_steps": "4", "strength": "0.5"}

    def edit(**extra):
        answer = httpx.post(
            f"{server.url}/v1/images/edits", data={**form, **extra}, files=files,
            headers=auth, timeout=60,
        )  # fmt: skip
        assert answer.status_code == 200, answer.text
        return int(answer.headers["X-Seed"]), _pixels(answer.json()["data"][0]["b64_json"])

    (seed_a, a), (seed_b, b) = edit(), edit()
    assert seed_a != seed_b and not np.array_equal(a, b)
    seed_again, again = edit(seed=str(seed_a))
    assert seed_again == seed_a
    np.testing.assert_array_equal(again, a)


def test_output_formats(client, image):
    for name, pillow in (("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")):
        result = client.images.edit(
            image=("p.png", png_bytes(image), "image/png"),
            prompt="a cat",
            output_format=name,  # type: ignore[arg-type]
            extra_body=SMALL,
        )
        data = base64.b64decode((result.data or [])[0].b64_json or "")
        assert PIL.Image.open(io.BytesIO(data)).format == pillow
        assert result.output_format == name


def test_output_compression_is_a_lossy_format_quality(client, image):
    """output_compression q: the jpeg or webp file Pillow writes at quality q from the png
    answer's pixels (the same seed), byte for byte, in the answer and the stream; without
    it, the server's quality (95, 90). A png takes 100 alone."""

    def edit(**arguments):
        result = client.images.edit(image=("p.png", png_bytes(image), "image/png"),
                                    prompt="a cat", extra_body=SMALL, **arguments)  # fmt: skip
        if arguments.get("stream"):
            *_, result = list(result)  # image_edit.completed
            return base64.b64decode(result.b64_json)
        return base64.b64decode((result.data or [])[0].b64_json or "")

    pixels = PIL.Image.open(io.BytesIO(edit(output_format="png", output_compression=100)))

    def pillow(name, quality):
        buffer = io.BytesIO()
        pixels.save(buffer, format=name, quality=quality)
        return buffer.getvalue()

    for name, default in (("jpeg", 95), ("webp", 90)):
        assert edit(output_format=name) == pillow(name, default)
        for quality in (10, 100):
            want = pillow(name, quality)
            assert edit(output_format=name, output_compression=quality) == want
        assert edit(output_format=name, output_compression=10, stream=True) == pillow(name, 10)
    assert len(pillow("jpeg", 10)) < len(pillow("jpeg", 95))  # tables and headers: 651, 1011
    for name, value in (("png", 50), ("jpeg", 101), ("webp", -1)):
        with pytest.raises(openai.BadRequestError, match="output_compression must be in"):
            edit(output_format=name, output_compression=value)


def test_models_lists_the_served_one(client):
    assert [model.id for model in client.models.list()] == ["tiny-img2img"]
    assert client.models.retrieve("tiny-img2img").owned_by == "sdtrt"
    with pytest.raises(openai.NotFoundError, match="this server has 'tiny-img2img'"):
        client.models.retrieve("dall-e-2")


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"mask": ("m.png", b"x", "image/png")}, openai.BadRequestError, "inpainting"),
        ({"response_format": "url"}, openai.BadRequestError, "no files to link to"),
        ({"background": "transparent"}, openai.BadRequestError, "no transparency"),
        ({"quality": "high"}, openai.BadRequestError, "num_inference_steps"),
        ({"output_format": "gif"}, openai.BadRequestError, "png, jpeg, webp"),
        ({"size": "1024"}, openai.BadRequestError, "WIDTHxHEIGHT"),
        ({"size": "30x48"}, openai.BadRequestError, "multiple of 8"),  # the library's message
        ({"n": 1.5}, openai.BadRequestError, "n must be an integer"),
        ({"model": "gpt-image-1"}, openai.NotFoundError, "this server has 'tiny-img2img'"),
        ({"extra_body": {"strenght": 0.5}}, openai.BadRequestError, "unknown field.* strenght"),
        ({"extra_body": {"strength": 2}}, openai.BadRequestError, "strength"),
        ({"extra_body": {"height": 64}}, openai.BadRequestError, "unknown field.* height"),
    ],
)
def test_what_cannot_be_done_as_asked_is_refused(client, image, arguments, error, message):
    with pytest.raises(error, match=message) as caught:
        client.images.edit(image=("p.png", png_bytes(image), "image/png"), prompt="a cat",
                           **arguments)  # fmt: skip
    body = caught.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error"


def test_a_wrong_key_and_a_json_body_are_refused(server, image):
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.images.edit(image=("p.png", png_bytes(image), "image/png"), prompt="a cat")
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    answer = httpx.post(
        f"{server.url}/v1/images/edits", json={"prompt": "a cat"},
        headers={"Authorization": f"Bearer {KEY}"},
    )  # fmt: skip
    assert answer.status_code == 400 and "multipart/form-data" in answer.json()["error"]["message"]


def test_the_form_reads_as_v1_fields():
    """read_edit alone: OpenAI's names as /v1/img2img's, its no-op values dropped, sdtrt's
    fields typed; two images refused."""
    edit = read_edit(
        {"image": b"png", "prompt": "a cat", "n": "3", "size": "64x32", "model": "m",
         "response_format": "b64_json", "quality": "auto", "background": "opaque",
         "user": "u1", "seed": "9", "strength": "0.25", "timeout": "30", "priority": "1"},
        "m",
    )  # fmt: skip
    assert edit.values == {
        "prompt": "a cat", "num_images_per_prompt": 3, "width": 64, "height": 32, "seed": 9,
        "strength": 0.25,
    }  # fmt: skip
    assert (edit.image, edit.output_format, edit.timeout, edit.priority) == (
        b"png", "png", "30", "1",
    )  # fmt: skip
    with pytest.raises(Exception, match="send one image file, got 2"):
        read_edit({"image[]": [b"a", b"b"], "prompt": "x"}, "m")
    with pytest.raises(Exception, match="image must be a file in the form"):
        read_edit({"image": "text", "prompt": "x"}, "m")
    for form in ({"image": b"png"}, {"image": b"png", "prompt": ""}):
        with pytest.raises(Exception, match="prompt is required"):
            read_edit(form, "m")


def test_docs_show_the_edit_fields(server):
    """/docs lists OpenAI's fields taken here and sdtrt's that come beside them (not the
    /v1 names OpenAI's replace)."""
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    form = paths["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]
    fields = form["schema"]["properties"]
    assert {"image", "prompt", "model", "n", "size", "output_format", "strength", "seed"} <= set(
        fields
    )
    assert not {"height", "width", "num_images_per_prompt"} & set(fields)
    assert fields["response_format"]["enum"] == ["b64_json"]
    assert fields["stream"]["type"] == "boolean" and "partial_images" in fields


def test_the_readme_client_runs_against_a_server(server, image, tmp_path, monkeypatch):
    """README's example, as written but for the address, model, size and steps."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```py\n(.*?)```", readme, re.S) if "images.edit" in b]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KEY", KEY)
    image.save("photo.png")
    code = (
        textwrap.dedent(block)
        .replace("http://localhost:8000", server.url)
        .replace('model="sd15"', 'model="tiny-img2img"')
        .replace('size="512x512"', 'size="48x32"')
        .replace('"num_inference_steps": 30', '"num_inference_steps": 4')
    )
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert [PIL.Image.open(f"cat-{i}.png").size for i in range(2)] == [(48, 32)] * 2


def test_a_streamed_edit_gives_partial_images_then_the_images(server, client, image):
    """stream with partial_images 2 of 4 steps: previews after steps 1 and 3 (OpenAI's
    image_edit.partial_image, one event per image), then image_edit.completed per image,
    the pixels of the same request unstreamed."""
    events = list(
        client.images.edit(
            image=("p.png", png_bytes(image), "image/png"),
            prompt="a cat",
            n=2,
            stream=True,
            partial_images=2,
            extra_body=SMALL | {"num_inference_steps": 8},
        )
    )
    kinds = [(e.type, getattr(e, "partial_image_index", None)) for e in events]
    partial, completed = "image_edit.partial_image", "image_edit.completed"
    assert kinds == [(partial, 0)] * 2 + [(partial, 1)] * 2 + [(completed, None)] * 2
    assert {(e.size, e.output_format, e.background) for e in events} == {("48x32", "png", "opaque")}
    expected = v1_images(server, image, {"prompt": "a cat", **SMALL, "num_inference_steps": 8,
                                          "num_images_per_prompt": 2})  # fmt: skip
    for event, theirs in zip(events[-2:], expected, strict=True):
        np.testing.assert_array_equal(_pixels(event.b64_json), theirs)
    previews = [_pixels(e.b64_json) for e in events[:4]]
    assert all(p.shape == (32, 48, 3) for p in previews)
    assert not np.array_equal(previews[0], previews[2])  # two steps' estimates


def test_a_stream_that_fails_raises_in_the_sdk(server, client, image, monkeypatch):
    backend = server.batcher.backend
    monkeypatch.setattr(backend, "decode_latents", lambda latents: torch.full(
        (len(latents), 3, 32, 48), float("nan")))  # fmt: skip
    stream = client.images.edit(image=("p.png", png_bytes(image), "image/png"), prompt="a cat",
                                stream=True, extra_body=SMALL)  # fmt: skip
    with pytest.raises(openai.APIError, match="NonFiniteOutputError"):
        list(stream)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"partial_images": 2}, "they come in a stream"),
        ({"stream": True, "partial_images": 4}, r"partial_images must be in \[0, 3\]"),
    ],
)
def test_partial_images_are_for_a_stream_of_at_most_three(client, image, arguments, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.images.edit(image=("p.png", png_bytes(image), "image/png"), prompt="a cat",
                           **arguments)  # fmt: skip
