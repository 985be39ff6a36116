"""The loop's shape: how many UNet calls, on which batch, from which step."""

from __future__ import annotations

import concurrent.futures
import logging
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.callbacks import SDCFGCutoffCallback

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
        (dict(output_type="jpg"), "output type must be one of pil, np, pt, latent"),
        (dict(height=36, width=48), "height 36 is not a multiple of 8"),
        (dict(generator=[torch.Generator()] * 2), "2 generators for a batch of 1 images"),
        (dict(generator=7), "generator is int; expected a torch.Generator, a list of one"),
        (dict(num_images_per_prompt=True), "num_images_per_prompt must be an integer >= 1"),
        (dict(num_inference_steps=6.0), "steps must be an integer >= 1, got 6.0"),
        (dict(strength=np.True_), "strength must be a number in (0, 1]"),
        (dict(eta=1.5), "eta must be a number in [0, 1] (DDIM's noise, TCD's gamma), got 1.5"),
        (dict(eta=float("nan")), "eta must be a number in [0, 1]"),
        (dict(clip_skip=2), "build the pipeline with from_pretrained(ModelSource(model, clip_"),
        (dict(prompt_embeds=torch.zeros(1, 77, 32)), "give prompt or prompt_embeds, one of"),
        (
            dict(negative_prompt="x", negative_prompt_embeds=torch.zeros(1, 77, 32)),
            "give negative_prompt or negative_prompt_embeds, not both",
        ),
    ],
)
def test_bad_arguments_are_refused(tiny, images, kwargs, message):
    pipe = Img2ImgPipeline.from_components(tiny, show_progress=False)
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        pipe("a", images[0], **{"num_inference_steps": 10, **kwargs})


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda w: {}, "give prompt or prompt_embeds, one of the two"),
        (
            lambda w: {"prompt_embeds": [[0.0]]},
            "prompt_embeds must be a float tensor [prompts, 77, ",
        ),
        (lambda w: {"prompt_embeds": torch.zeros(1, 77, w, dtype=torch.long)}, "torch.int64"),
        (lambda w: {"prompt_embeds": torch.zeros(1, 76, w)}, "has shape [1, 76, "),
        (lambda w: {"prompt_embeds": torch.zeros(1, 77, w + 1)}, "the text encoder's output"),
        (lambda w: {"prompt_embeds": torch.zeros(0, 77, w)}, "has shape [0, 77, "),
        (lambda w: {"prompt_embeds": torch.full((1, 77, w), float("nan"))}, "NaN or infinite"),
        (
            lambda w: {
                "prompt_embeds": torch.zeros(1, 77, w),
                "negative_prompt_embeds": torch.zeros(2, 77, w),
            },
            "negative_prompt_embeds holds 2 prompts, the prompts are 1",
        ),
    ],
)
def test_bad_prompt_embeddings_are_refused(tiny, images, make, message):
    """Embeddings in place of prompts must be the text encoder's output for this model
    ([prompts, 77, its width]: every backend's UNet takes that), before any network runs."""
    pipe = Img2ImgPipeline.from_components(tiny, show_progress=False)
    pipe.backend = CountingBackend(pipe.backend)
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        pipe(image=images[0], num_inference_steps=4, **make(pipe.text_shape[1]))
    assert pipe.backend.calls == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(torch_dtype=torch.float16), "torch_dtype: give backend=TorchOptions(dtype='fp16')"),
        (dict(variant="fp16"), "variant: give model=ModelSource(folder, variant='fp16')"),
        (dict(device_map="cuda"), "device_map: give backend=TorchOptions(device='cuda')"),
        (dict(clip_skip=1), "clip_skip: give model=ModelSource(model, clip_skip=N)"),
        (dict(revision="main", token="x"), "revision, token: not sdtrt keywords"),
    ],
)
def test_diffusers_keywords_say_the_sdtrt_way(kwargs, message, monkeypatch):
    """diffusers' from_pretrained keywords and ``pipe.to()`` are refused before any load,
    saying where sdtrt takes the same thing (typed backend options, ModelSource)."""
    import sdtrt.models

    monkeypatch.setattr(sdtrt.models, "load_components", None)  # a load would fail the test
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        Img2ImgPipeline.from_pretrained("tiny", **kwargs)


@pytest.mark.parametrize("scheduler", ["lms", "dpmpp_2m"])
def test_threads_sharing_a_pipeline_get_their_own_images(tiny, images, scheduler):
    """A pipeline shared by threads (a web framework's worker pool): each call gets the
    image it would get alone. Unguarded, the scheduler's state was shared: IndexError, or
    another request's step."""
    from sdtrt.serve.batcher import intra_op_threads

    pipe = Img2ImgPipeline.from_components(tiny, scheduler=scheduler, show_progress=False)
    # Every call at this thread's intra-op thread count: a thread made while another holds
    # a different count (an earlier test's server worker) takes that one, and other counts
    # round differently.
    threads = torch.get_num_threads()

    def run(i):
        generator = torch.Generator().manual_seed(i)
        with intra_op_threads(threads):
            return pipe(f"a red circle {i}", images[0], num_inference_steps=12, generator=generator)

    alone = [run(i).images[0] for i in range(3)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        together = [f.result().images[0] for f in [pool.submit(run, i) for i in range(3)]]
    for i in range(3):
        assert np.array_equal(np.asarray(together[i]), np.asarray(alone[i])), i
    assert not np.array_equal(np.asarray(alone[0]), np.asarray(alone[1]))


def test_pipe_to_names_the_backend_options(tiny):
    import sdtrt

    pipe = sdtrt.Img2ImgPipeline.from_components(tiny, sdtrt.TorchOptions(), show_progress=False)
    with pytest.raises(InvalidInputError, match=re.escape("TorchOptions(device='cuda'")):
        pipe.to("cuda")


_PIXELS = np.random.default_rng(1).random((32, 48, 3), dtype=np.float32)


@pytest.mark.parametrize(
    "image, message",
    [
        (None, "image is None; expected a PIL image, a float numpy array"),
        ("photo.png", "image is str; expected a PIL image"),
        (Path("p.png"), "kinds; a file name is opened by the caller: image=diffusers.utils"),
        ([], "image is an empty list"),
        ([PIL.Image.new("RGB", (48, 32)), _PIXELS], "image mixes kinds in one list"),
        (PIL.Image.new("RGB", (0, 0)), "image is 0x0 pixels"),
        (_PIXELS[..., :2], "numpy array of shape [32, 48, 2]; expected [H, W, 3] or [B, H, W, 3]"),
        (_PIXELS[..., 0], "numpy array of shape [32, 48]"),
        ([_PIXELS, _PIXELS[:16]], "shapes [32, 48, 3] and [16, 48, 3]: give one shape"),
        ((_PIXELS * 255).astype(np.uint8), "numpy array of uint8; expected floats in [0, 1]"),
        (_PIXELS * 255, "image values span [0.0244859, 254.947]; a numpy array takes [0, 1]"),
        (_PIXELS - 0.5, "a numpy array takes [0, 1]"),
        (np.full((32, 48, 3), np.nan), "image values span [nan, nan]"),
        ([torch.zeros(4, 2, 3)] * 2, "(latents: one tensor [B, 4, h, w], not a list)"),
        (torch.zeros(1, 4, 2, 3, dtype=torch.int64), "latents must be floats [B, 4, h, w]"),
        (torch.zeros(0, 4, 2, 3), "latents must be floats [B, 4, h, w], not empty"),
        (torch.full((1, 4, 2, 3), torch.inf), "image (latents) holds NaN or infinite values"),
        (torch.zeros(3, 32, 48, dtype=torch.uint8), "tensor of torch.uint8; expected floats"),
        (torch.full((3, 32, 48), -2.0), "a torch tensor takes [0, 1] (or [-1, 1])"),
    ],
)
def test_bad_images_are_refused_saying_what_is_taken(tiny, image, message):
    """A wrong ``image`` fails before any network runs, with what diffusers' image
    processor takes, rather than deep in the VAE or as a silently wrong picture (a uint8
    array or one in [0, 255] reads as floats far outside [0, 1])."""
    pipe = Img2ImgPipeline.from_components(tiny, show_progress=False)
    pipe.backend = CountingBackend(pipe.backend)
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        pipe("a", image, num_inference_steps=4)
    assert pipe.backend.calls == []


def test_every_image_kind_gives_the_same_picture(tiny):
    """A PIL image, its float array (with or without the batch axis, alone or in a list)
    and its tensor in [0, 1] or [-1, 1]: the same latents; a 16-bit grayscale PIL image
    those of its 8-bit self (Pillow's RGB conversion would clip it white)."""
    pipe = Img2ImgPipeline.from_components(tiny, show_progress=False)
    pixels = np.random.default_rng(2).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    floats = pixels.astype(np.float32) / 255
    tensor = torch.from_numpy(floats).permute(2, 0, 1)
    grey = pixels[..., 0]

    def run(image):
        return pipe(
            "a", image, num_inference_steps=4, output_type="latent",
            generator=torch.Generator().manual_seed(3),
        ).images  # fmt: skip

    want = run(PIL.Image.fromarray(pixels))
    for same in (floats, floats[None], [floats], tensor, tensor[None] * 2 - 1, [tensor]):
        torch.testing.assert_close(run(same), want, rtol=0, atol=1e-5)
    deep = PIL.Image.fromarray(grey.astype(np.uint16) * 257)
    assert deep.mode == "I;16"
    torch.testing.assert_close(run(deep), run(PIL.Image.fromarray(grey)), rtol=0, atol=0)


def test_pt_output_is_the_np_output_as_an_ordinary_tensor(tiny, images):
    pipe = Img2ImgPipeline.from_components(tiny, show_progress=False)
    run = dict(num_inference_steps=4, height=32, width=48)
    as_np = pipe(
        "a", images[0], generator=torch.Generator().manual_seed(1), output_type="np", **run
    )
    as_pt = pipe(
        "a", images[0], generator=torch.Generator().manual_seed(1), output_type="pt", **run
    )
    assert as_pt.images.shape == (1, 3, 32, 48) and not as_pt.images.is_inference()
    np.testing.assert_array_equal(as_pt.images.permute(0, 2, 3, 1).numpy(), as_np.images)


def test_numpy_numbers_are_taken_as_python_ones(tiny, images):
    """Numbers from a numpy sweep (np.linspace, np.arange) are numbers: the same image as
    Python's (they were refused: "strength must be a number in (0, 1], got 0.5")."""
    pipe = Img2ImgPipeline.from_components(tiny, show_progress=False)
    plain = dict(strength=0.5, num_inference_steps=6, guidance_scale=7.0, height=32, width=48)
    from_numpy = dict(
        strength=np.float32(0.5),
        num_inference_steps=np.int64(6),
        guidance_scale=np.float64(7.0),
        height=np.int32(32),
        width=np.int64(48),
    )
    outs = [
        pipe(
            "a",
            images[0],
            generator=torch.Generator().manual_seed(2),
            output_type="np",
            num_images_per_prompt=per,
            **run,
        )  # fmt: skip
        for per, run in ((2, plain), (np.int8(2), from_numpy))
    ]
    assert outs[0].unet_calls == outs[1].unet_calls == 3
    np.testing.assert_array_equal(outs[1].images, outs[0].images)
    one = dict(generator=torch.Generator().manual_seed(2), output_type="np", **plain)
    want = pipe("a", images[0], **one).images
    one.update(generator=torch.Generator().manual_seed(2), strength=None, start_step=np.int64(3))
    np.testing.assert_array_equal(pipe("a", images[0], **one).images, want)


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


@pytest.mark.parametrize(
    "callback, names, message",
    [
        ("print", ["latents"], "callback_on_step_end must be a function (pipe, step"),
        (lambda *a: {}, "latents", "tensor_inputs must be a list of names, got 'latents'"),
        (lambda *a: {}, ["noise_pred"], "may name latents, prompt_embeds, negative_prompt_em"),
        (lambda *a: None, ["latents"], "must return a dict (the tensors it changes, or {})"),
        (
            lambda pipe, i, t, tensors: {"latents": tensors["latents"][:1]},
            ["latents"],
            "returned latents [1, 4, 4, 6]; expected a tensor of shape [2, 4, 4, 6]",
        ),
        (
            lambda *a: {"prompt_embeds": 1.0},
            ["latents"],
            "returned prompt_embeds float; expected a tensor of shape [4, 77, 32]",
        ),
        (  # diffusers' cutoff keeps one text row: one image's cond half, not two images'
            SDCFGCutoffCallback(cutoff_step_ratio=0.0),
            ["latents"],
            "returned prompt_embeds [1, 77, 32]; expected a tensor of shape [2, 77, 32] "
            "([uncond, cond] rows while guidance is on, the cond rows alone once",
        ),
        (  # guidance turned off, the text batch left whole
            lambda pipe, *a: setattr(pipe, "_guidance_scale", 0.0) or {},
            ["latents"],
            "returned prompt_embeds [4, 77, 32]; expected a tensor of shape [2, 77, 32]",
        ),
        (
            lambda pipe, *a: setattr(pipe, "_guidance_scale", float("nan")) or {},
            ["latents"],
            "set pipe._guidance_scale to nan: give a finite number (above 1: guidance on",
        ),
    ],
)
def test_bad_step_end_callbacks_are_refused_saying_what_is_taken(
    counted, images, callback, names, message
):
    """A callback, its tensor names and what it returns (and the guidance it leaves) are
    checked: names before any network runs, returns at the first step, each error saying
    what is taken."""
    pipe, backend = counted()
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        pipe(["a", "b"], images, num_inference_steps=4, callback_on_step_end=callback,
             callback_on_step_end_tensor_inputs=names)  # fmt: skip
    checked_at_step_end = "return" in message or "_guidance_scale" in message
    assert len(backend.calls) == (1 if checked_at_step_end else 0)


@pytest.mark.parametrize(
    "scheduler, custom, message",
    [
        ("euler", {"timesteps": [999, 500], "sigmas": [1.0, 0.0]}, "timesteps or sigmas, not"),
        ("lms", {"timesteps": [999, 500]}, "LMSDiscreteScheduler takes no custom timesteps; "
         "the schedulers that take them: euler, dpmpp_2m, lcm, tcd"),
        ("euler_a", {"sigmas": [1.0, 0.0]}, "takes no custom sigmas; the schedulers that take "
         "them: euler"),
        ("dpmpp_2m_karras", {"timesteps": [999, 500]}, "DPMSolverMultistepScheduler refuses "
         "these timesteps (Cannot use `timesteps` with `config.use_karras_sigmas = True`); "
         "the schedulers that take them: euler, dpmpp_2m, lcm, tcd"),
        ("euler", {"timesteps": []}, "timesteps must be a non-empty list of finite numbers"),
        ("euler", {"timesteps": "999,500"}, "must be a non-empty list of finite numbers"),
        ("euler", {"sigmas": [1.0, float("nan")]}, "sigmas must be a non-empty list of finite"),
        ("euler", {"timesteps": [999, 500.5]}, "timesteps must be integers in [0, 1000)"),
        ("euler", {"timesteps": [1000, 500]}, "timesteps must be integers in [0, 1000)"),
        ("euler", {"sigmas": [1.0, -1.0]}, "sigmas must be >= 0"),
        ("lcm", {"timesteps": [500, 999]}, "timesteps must be in descending order (the "
         "noisiest first), got [500.0, 999.0]"),
        ("euler", {"sigmas": [1.0, 1.0, 0.0]}, "sigmas must be in descending order"),
        ("unipc", {"sigmas": [1.0, 0.0]}, "refuses these sigmas (Passing `sigmas` is only "
         "supported when"),
    ],
)  # fmt: skip
def test_bad_custom_schedules_are_refused_before_any_work(counted, images, scheduler, custom,
                                                          message):  # fmt: skip
    pipe, backend = counted(scheduler)
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        pipe("a", images[0], **custom)
    assert backend.calls == []


ESTIMATED_AT_THE_END = ("euler", "euler_a", "dpmpp_2m", "unipc", "dpmpp_2m_karras", "lcm")


@pytest.mark.parametrize("name", ["lms", "ddim", "pndm", *ESTIMATED_AT_THE_END, "tcd"])
def test_a_step_and_its_estimate_of_the_finished_latents(tiny, name):
    """``step_and_estimate`` (what a preview decodes) takes the very step ``step`` takes;
    its estimate is the scheduler's x0, far from the noisy latents at the first step and,
    where the last step lands on x0, equal to the finished latents; PNDM and TCD give no
    x0: the next latents stand for it."""
    import copy

    from sdtrt.runtime.schedulers import make_scheduler, step_kwargs
    from sdtrt.runtime.steps import step, step_and_estimate

    plain = make_scheduler(name, tiny["scheduler"].config)
    plain.set_timesteps(8)
    estimating = copy.deepcopy(plain)
    draws = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=draws) * plain.init_noise_sigma
    direction = torch.randn(1, 4, 8, 8, generator=draws)
    extras = [step_kwargs(s, torch.Generator().manual_seed(1), 0.0) for s in (plain, estimating)]
    gaps = []
    for t in plain.timesteps:
        noise_pred = 0.5 * direction + 0.1 * latents  # a stand-in UNet
        expected = step(plain, noise_pred, t, latents, 1.0, extras[0])
        latents, estimate = step_and_estimate(estimating, noise_pred, t, latents, 1.0, extras[1])
        assert torch.equal(latents, expected)
        gaps.append((estimate - latents).abs().max().item())
    if name in ("pndm", "tcd"):
        assert gaps == [0.0] * len(gaps)
        return
    assert gaps[0] > 1.0
    if name in ESTIMATED_AT_THE_END:
        assert gaps[-1] < 1e-5
