"""The loop's shape: how many UNet calls, on which batch, from which step."""

from __future__ import annotations

import logging
import re

import numpy as np
import PIL.Image
import pytest
import torch

from sdtrt.errors import InvalidInputError
from sdtrt.runtime.inputs import resolve_start_step
from sdtrt.runtime.pipeline import Img2ImgPipeline


class CountingBackend:
    """Wraps a backend and records every UNet call's batch and timestep."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[tuple[int, float]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def unet(self, sample, timestep, hidden):
        self.calls.append((sample.shape[0], float(timestep)))
        return self.inner.unet(sample, timestep, hidden)


@pytest.fixture
def counted(tiny):
    def make(scheduler: str = "lms") -> tuple[Img2ImgPipeline, CountingBackend]:
        pipe = Img2ImgPipeline.from_components(tiny, scheduler=scheduler, show_progress=False)
        pipe.backend = CountingBackend(pipe.backend)
        return pipe, pipe.backend

    return make


@pytest.mark.parametrize(
    "scheduler, steps, strength, expected",
    [
        ("lms", 50, 0.8, 40),
        ("lms", 10, 0.5, 5),
        ("ddim", 7, 0.3, 2),
        ("euler_a", 12, 1.0, 12),
        ("dpmpp_2m", 9, 0.75, 6),
        ("unipc", 4, 0.25, 1),
        # PLMS (PNDM with skip_prk_steps) runs its second timestep twice.
        ("pndm", 10, 0.5, 6),
    ],
)
def test_unet_call_count(counted, images, scheduler, steps, strength, expected):
    pipe, backend = counted(scheduler)
    out = pipe("a", images[0], strength=strength, num_inference_steps=steps, output_type="latent")
    assert len(backend.calls) == out.unet_calls == expected
    assert all(batch == 2 for batch, _ in backend.calls)  # [uncond, cond] in ONE call


def test_latents_come_back_as_ordinary_tensors(tiny, images):
    """The loop runs in inference mode; what the caller gets can still be changed in place."""
    pipe = Img2ImgPipeline.from_components(tiny, show_progress=False)
    latents = pipe("a", images[0], num_inference_steps=2, output_type="latent").images
    assert not latents.is_inference()
    before = latents.clone()
    latents.mul_(2)
    assert torch.equal(latents, 2 * before)


def test_start_step_skips_the_first_timesteps(counted, images):
    pipe, backend = counted("euler")
    pipe("a", images[0], start_step=3, num_inference_steps=8, output_type="latent")
    pipe.scheduler.set_timesteps(8)
    assert [t for _, t in backend.calls] == [float(t) for t in pipe.scheduler.timesteps[3:]]


def test_start_step_and_strength_are_the_same_knob(tiny, images):
    pipe = Img2ImgPipeline.from_components(tiny, show_progress=False)
    run = dict(num_inference_steps=10, output_type="np")
    a = pipe("a", images[0], start_step=2, generator=torch.Generator().manual_seed(0), **run)
    b = pipe("a", images[0], strength=0.8, generator=torch.Generator().manual_seed(0), **run)
    np.testing.assert_array_equal(a.images, b.images)
    assert resolve_start_step(50, None, None) == 10  # the seed's default
    assert resolve_start_step(50, 0.8, None) == 10


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strength=0.0), "strength must be in (0, 1]"),
        (dict(strength=1.5), "strength must be in (0, 1]"),
        (dict(strength=0.01), "leaves no denoising step"),
        (dict(start_step=10), "start step must be an integer in [0, 10)"),
        (dict(start_step=-1), "start step must be an integer in [0, 10)"),
        (dict(strength=0.5, start_step=2), "not both"),
        (dict(guidance_scale=float("nan")), "finite number"),
        (dict(output_type="pt"), "output type must be one of"),
        (dict(height=36, width=48), "height 36 is not a multiple of 8"),
    ],
)
def test_bad_arguments_are_refused(tiny, images, kwargs, message):
    pipe = Img2ImgPipeline.from_components(tiny, show_progress=False)
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        pipe("a", images[0], **{"num_inference_steps": 10, **kwargs})


def test_rgba_grey_and_any_size_are_accepted(tiny):
    pipe = Img2ImgPipeline.from_components(tiny, show_progress=False)
    rgba = PIL.Image.new("RGBA", (37, 23), (200, 10, 10, 128))
    grey = PIL.Image.new("L", (70, 50), 90)
    for picture in (rgba, grey):
        out = pipe("", picture, num_inference_steps=2, height=32, width=16, output_type="np")
        assert out.images.shape == (1, 32, 16, 3)


def test_long_prompt_is_truncated_with_a_warning(tiny, images, caplog):
    pipe = Img2ImgPipeline.from_components(tiny, show_progress=False)
    with caplog.at_level(logging.WARNING):
        pipe(" ".join(["dancer"] * 100), images[0], num_inference_steps=2, output_type="latent")
    assert "truncated" in caplog.text
