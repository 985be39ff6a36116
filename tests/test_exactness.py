"""The torch backend's img2img equals diffusers' StableDiffusionImg2ImgPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import diffusers_img2img

from sdtrt.errors import InvalidInputError
from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.runtime.schedulers import SCHEDULERS

CASES = [
    pytest.param(1, None, id="b1"),
    pytest.param(1, "blurry", id="b1-neg"),
    pytest.param(2, None, id="b2"),
    pytest.param(2, "blurry", id="b2-neg"),
]


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_equals_diffusers(tiny, images, scheduler):
    ours = Img2ImgPipeline.from_components(tiny, scheduler=scheduler, show_progress=False)
    reference = diffusers_img2img(tiny, scheduler)
    for strength in (0.3, 0.8, 1.0):
        for batch, negative in (c.values for c in CASES):
            prompts = ["A colorful dancer, nat geo photo", "a cat"][:batch]
            negatives = None if negative is None else [negative] * batch
            picture = images[0] if batch == 1 else images
            kwargs = dict(
                strength=strength,
                num_inference_steps=8,
                guidance_scale=8.0,
                negative_prompt=negatives,
                output_type="np",
            )
            got = ours(prompts, picture, generator=torch.Generator().manual_seed(32), **kwargs)
            want = reference(
                prompts, picture, generator=torch.Generator().manual_seed(32), **kwargs
            ).images
            assert got.images.shape == want.shape == (batch, 32, 48, 3)
            diff = float(np.abs(got.images - want).max())
            assert diff == 0.0, f"{scheduler} strength={strength} batch={batch}: {diff}"


@pytest.mark.parametrize("name", ["HeunDiscreteScheduler", "DEISMultistepScheduler"])
@pytest.mark.parametrize("tabulated", [False, True], ids=["eager", "step-table"])
def test_a_scheduler_swapped_in_the_diffusers_way_gives_diffusers_image(
    tiny, images, name, tabulated
):
    """``pipe.scheduler = X.from_config(pipe.scheduler.config)``, diffusers' idiom, with a
    scheduler sdtrt does not name (Heun takes two UNet calls a step): diffusers' image;
    where --step-graphs would replay steps, an untabulated one runs the eager loop."""
    import diffusers

    ours = Img2ImgPipeline.from_components(tiny, show_progress=False)
    if tabulated:
        ours.backend.step_unet = ours.backend.unet
    ours.scheduler = getattr(diffusers, name).from_config(ours.scheduler.config)
    reference = diffusers_img2img(tiny, "lms")
    reference.scheduler = getattr(diffusers, name).from_config(reference.scheduler.config)
    kwargs = dict(strength=0.8, num_inference_steps=6, guidance_scale=8.0, output_type="np")
    got = ours("a red circle", images[0], generator=torch.Generator().manual_seed(4), **kwargs)
    want = reference(
        "a red circle", images[0], generator=torch.Generator().manual_seed(4), **kwargs
    )
    assert got.images.shape == want.images.shape == (1, 32, 48, 3)
    assert float(np.abs(got.images - want.images).max()) == 0.0
    assert got.unet_calls == (7 if name.startswith("Heun") else 4)  # Heun: 2 per step but the last


@pytest.mark.parametrize("scheduler", ["lms", "euler_a"])
@pytest.mark.parametrize("tabulated", [False, True], ids=["eager", "step-table"])
def test_one_generator_per_image_equals_diffusers(tiny, images, scheduler, tabulated):
    """diffusers' list of generators, one per image of the batch (2 prompts x 2 images):
    image i samples its latent and draws its noise (each step's too, Euler ancestral) from
    generator i, in the eager loop and in the tabulated steps --step-graphs replays."""
    ours = Img2ImgPipeline.from_components(tiny, scheduler=scheduler, show_progress=False)
    if tabulated:
        ours.backend.step_unet = ours.backend.unet  # what --step-graphs gives on a GPU
    reference = diffusers_img2img(tiny, scheduler)
    kwargs = dict(strength=0.8, num_inference_steps=6, guidance_scale=8.0, output_type="np")
    kwargs["num_images_per_prompt"] = 2
    generators = lambda: [torch.Generator().manual_seed(seed) for seed in (5, 6, 7, 8)]  # noqa: E731
    got = ours(["a red circle", "a cat"], images, generator=generators(), **kwargs).images
    want = reference(["a red circle", "a cat"], images, generator=generators(), **kwargs).images
    assert (ours.step_graphs is not None) == tabulated
    assert got.shape == want.shape == (4, 32, 48, 3)
    # diffusers encodes each image alone here (ours in one VAE call): not to the last bit.
    assert float(np.abs(got - want).max()) <= 2e-5
    assert float(np.abs(got[0] - got[1]).max()) > 0.05  # one prompt and image, two draws


@pytest.mark.parametrize("scheduler", ["lms", "euler_a"])
@pytest.mark.parametrize("one_generator", [True, False], ids=["generator", "generator-list"])
def test_latents_as_the_image_equal_diffusers_and_skip_the_encoder(
    tiny, images, scheduler, one_generator
):
    """Latents given as the image (what ``output_type="latent"`` gave: a first run's, to
    refine or chain), as diffusers' img2img takes them: not encoded, no draw for them, the
    picture the latents' size; diffusers' image to the last bit, per-image generators too
    (diffusers encodes nothing here, so nothing is batched differently)."""
    ours = Img2ImgPipeline.from_components(tiny, scheduler=scheduler, show_progress=False)
    reference = diffusers_img2img(tiny, scheduler)
    seed = torch.Generator().manual_seed(1)
    first = ours(["a red circle", "a cat"], images, strength=1.0, num_inference_steps=6,
                 generator=seed, output_type="latent").images  # fmt: skip
    assert first.shape == (2, 4, 4, 6)
    calls: list[int] = []
    encode = ours.backend.encode_image
    ours.backend.encode_image = lambda pixels: calls.append(len(pixels)) or encode(pixels)
    kwargs = dict(strength=0.6, num_inference_steps=10, guidance_scale=7.5, output_type="np")
    kwargs["num_images_per_prompt"] = 2

    def generator():
        if one_generator:
            return torch.Generator().manual_seed(9)
        return [torch.Generator().manual_seed(seed) for seed in (5, 6, 7, 8)]

    got = ours(["a blue square", "a dog"], first, generator=generator(), **kwargs)
    want = reference(["a blue square", "a dog"], first, generator=generator(), **kwargs)
    assert got.images.shape == want.images.shape == (4, 32, 48, 3)
    assert float(np.abs(got.images - want.images).max()) == 0.0
    assert calls == [] and "vae_encoder" not in got.timings_ms and got.unet_calls == 6
    # One latent [4, h, w] is one image; a size given must be the latents' own.
    one = ours("a dog", first[0], strength=0.6, num_inference_steps=4, output_type="np",
               height=32, width=48)  # fmt: skip
    assert one.images.shape == (1, 32, 48, 3) and calls == []
    with pytest.raises(InvalidInputError, match="a 48x32 picture, not 48x64: latents given"):
        ours("a dog", first, height=64)


@pytest.mark.parametrize("scheduler", ["lms", "euler_a", "dpmpp_2m"])
def test_a_step_end_callback_sees_and_changes_what_diffusers_callback_does(tiny, images, scheduler):
    """diffusers' ``callback_on_step_end``: called after each step with (pipe, step index,
    timestep, the tensors named), what it returns replaces them for the next step (here
    the latents damped once, the text batch's cond half swapped for the uncond one), and
    ``pipe._interrupt = True`` skips the rest of the steps. diffusers' image to the last
    bit, the same calls; the tabulated steps ``--step-graphs`` replays give way to the
    eager loop, which the callback needs."""
    ours = Img2ImgPipeline.from_components(tiny, scheduler=scheduler, show_progress=False)
    ours.backend.step_unet = ours.backend.unet  # what --step-graphs gives on a GPU
    reference = diffusers_img2img(tiny, scheduler)

    def recorder(seen):
        def on_step_end(pipe, i, t, tensors):
            seen.append((i, float(t), sorted(tensors), tuple(tensors["latents"].shape)))
            if i == 1:
                return {"latents": tensors["latents"] * 0.9}
            if i == 2:
                uncond = tensors["negative_prompt_embeds"]
                return {"prompt_embeds": torch.cat([uncond, uncond])}
            if i == 4:
                pipe._interrupt = True
            return {}

        return on_step_end

    kwargs = dict(strength=0.8, num_inference_steps=10, guidance_scale=7.5, output_type="np")
    kwargs["callback_on_step_end_tensor_inputs"] = ["latents", "prompt_embeds",
                                                    "negative_prompt_embeds"]  # fmt: skip
    seen_ours: list = []
    seen_theirs: list = []
    got = ours(["a red circle", "a cat"], images, generator=torch.Generator().manual_seed(2),
               callback_on_step_end=recorder(seen_ours), **kwargs)  # fmt: skip
    want = reference(["a red circle", "a cat"], images, generator=torch.Generator().manual_seed(2),
                     callback_on_step_end=recorder(seen_theirs), **kwargs)  # fmt: skip
    assert seen_ours == seen_theirs and [i for i, *_ in seen_ours] == [0, 1, 2, 3, 4]
    assert got.images.shape == want.images.shape == (2, 32, 48, 3)
    assert float(np.abs(got.images - want.images).max()) == 0.0
    assert got.unet_calls == 5 and ours.interrupt and ours.step_graphs is None
    # The next call starts uninterrupted, with no callback: all 8 steps.
    assert ours("a cat", images[0], **{**kwargs, "callback_on_step_end_tensor_inputs": ()}
                ).unet_calls == 8  # fmt: skip


@pytest.mark.parametrize("scheduler", ["lms", "euler_a", "dpmpp_2m"])
def test_a_guidance_cutoff_callback_equals_diffusers(tiny, images, scheduler):
    """diffusers' callback objects: ``SDCFGCutoffCallback`` turns guidance off after 40% of
    the steps (``pipe._guidance_scale = 0``, the text batch's cond row kept), and from then
    on the UNet runs on the image's row alone; a callback of one's own does the same for
    two images, and one changes the scale at each step (a guidance schedule), several in
    ``MultiPipelineCallbacks``; sdtrt's ``GuidanceCutoffCallback`` cuts two images.
    diffusers' image to the last bit each time."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback, SDCFGCutoffCallback

    from sdtrt.runtime.guidance import GuidanceCutoffCallback

    ours = Img2ImgPipeline.from_components(tiny, scheduler=scheduler, show_progress=False)
    rows: list[int] = []
    unet = ours.backend.unet
    ours.backend.unet = lambda x, t, texts: rows.append(len(x)) or unet(x, t, texts)
    reference = diffusers_img2img(tiny, scheduler)
    kwargs = dict(strength=0.8, num_inference_steps=13, guidance_scale=7.5, output_type="np")

    def compare(prompts, picture, callback):
        seed = torch.Generator().manual_seed(3)
        got = ours(prompts, picture, generator=seed, callback_on_step_end=callback, **kwargs)
        seed = torch.Generator().manual_seed(3)
        want = reference(prompts, picture, generator=seed, callback_on_step_end=callback,
                         **kwargs).images  # fmt: skip
        assert got.images.shape == want.shape
        assert float(np.abs(got.images - want).max()) == 0.0
        assert ours.num_timesteps == reference.num_timesteps == got.unet_calls == 10
        return got

    compare("a red circle", images[0], SDCFGCutoffCallback(cutoff_step_ratio=0.4))
    assert rows == [2] * 5 + [1] * 5  # steps 0-4 guided: the callback ends step 4 (int(0.4 * 10))
    assert ours.guidance_scale == 0.0 and not ours.do_classifier_free_guidance

    class CondHalf(PipelineCallback):  # the cutoff for a batch: the cond half, not one row
        tensor_inputs = ["prompt_embeds"]

        def callback_fn(self, pipe, i, t, tensors):
            if i == 2:
                pipe._guidance_scale = 1.0
                return {"prompt_embeds": tensors["prompt_embeds"].chunk(2)[1]}
            return tensors

    class Decaying(PipelineCallback):  # guidance 7.5 -> 6.5 -> 5.5 ... while on
        tensor_inputs = ["latents"]

        def callback_fn(self, pipe, i, t, tensors):
            if pipe.do_classifier_free_guidance:
                pipe._guidance_scale -= 1.0
            return tensors

    rows.clear()
    compare(["a red circle", "a cat"], images, MultiPipelineCallbacks([Decaying(), CondHalf()]))
    assert rows == [4] * 3 + [2] * 7
    # sdtrt's cutoff callback (what --guidance-cutoff runs) cuts a batch as CondHalf does.
    rows.clear()
    compare(["a red circle", "a cat"], images, GuidanceCutoffCallback(cutoff_step_ratio=0.4))
    assert rows == [4] * 5 + [2] * 5
    # The next call is guided again, whatever the last one's callback left.
    rows.clear()
    ours("a cat", images[0], num_inference_steps=4, output_type="latent")
    assert rows == [2] * 3 and ours.guidance_scale == 8.0


# Align Your Steps' 10-step schedules for SD 1.5 (diffusers' AysSchedules): its timesteps,
# and its sigmas (11: the last, 0, where the last step ends).
AYS_TIMESTEPS = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
AYS_SIGMAS = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.0]


@pytest.mark.parametrize(
    "scheduler, custom",
    [
        ("euler", {"timesteps": AYS_TIMESTEPS}),
        ("euler", {"sigmas": AYS_SIGMAS}),
        ("dpmpp_2m", {"timesteps": AYS_TIMESTEPS}),
        ("lcm", {"timesteps": [999, 759, 499, 259]}),
    ],
    ids=["euler-timesteps", "euler-sigmas", "dpmpp_2m-timesteps", "lcm"],
)
@pytest.mark.parametrize("tabulated", [False, True], ids=["eager", "step-table"])
def test_a_custom_schedule_equals_diffusers(tiny, images, scheduler, custom, tabulated):
    """diffusers' ``timesteps`` or ``sigmas`` (Align Your Steps' here): the schedule's
    steps, whatever ``num_inference_steps`` says, cut by the strength as diffusers cuts
    them; diffusers' image to the last bit, in the eager loop and the tabulated steps."""
    ours = Img2ImgPipeline.from_components(tiny, scheduler=scheduler, show_progress=False)
    if tabulated:
        ours.backend.step_unet = ours.backend.unet  # what --step-graphs gives on a GPU
    reference = diffusers_img2img(tiny, scheduler)
    kwargs = dict(strength=0.6, num_inference_steps=50, guidance_scale=3.0, output_type="np")
    got = ours(["a red circle", "a cat"], images, generator=torch.Generator().manual_seed(6),
               **kwargs, **custom)  # fmt: skip
    want = reference(["a red circle", "a cat"], images, generator=torch.Generator().manual_seed(6),
                     **kwargs, **custom).images  # fmt: skip
    assert (ours.step_graphs is not None) == tabulated
    assert got.images.shape == want.shape == (2, 32, 48, 3)
    assert float(np.abs(got.images - want).max()) == 0.0
    steps = len(next(iter(custom.values()))) - ("sigmas" in custom)
    assert got.unet_calls == int(steps * 0.6)
    # The next call without one is the count's schedule again.
    plain = dict(kwargs, num_inference_steps=5)
    assert ours("a cat", images[0], **plain).unet_calls == 3


def test_prompt_embeddings_equal_diffusers_and_their_prompts(tiny, images):
    """``prompt_embeds`` and ``negative_prompt_embeds`` (what prompt-weighting tools such as
    compel hand over) in place of prompts: diffusers' image for the same embeddings, and the
    prompts' own image where they are the text encoder's output for them."""
    from sdtrt.runtime.steps import token_ids

    ours = Img2ImgPipeline.from_components(tiny, scheduler="euler_a", show_progress=False)
    reference = diffusers_img2img(tiny, "euler_a")
    width = tiny["text_encoder"].config.hidden_size
    embeds = torch.randn(2, 77, width, generator=torch.Generator().manual_seed(0))
    negative = torch.randn(2, 77, width, generator=torch.Generator().manual_seed(1))
    kwargs = dict(strength=0.7, num_inference_steps=6, guidance_scale=6.0, output_type="np")
    kwargs["num_images_per_prompt"] = 2
    got = ours(None, images, generator=torch.Generator().manual_seed(4),
               prompt_embeds=embeds, negative_prompt_embeds=negative, **kwargs)  # fmt: skip
    want = reference(image=images, generator=torch.Generator().manual_seed(4),
                     prompt_embeds=embeds, negative_prompt_embeds=negative, **kwargs)  # fmt: skip
    assert got.images.shape == want.images.shape == (4, 32, 48, 3)
    assert float(np.abs(got.images - want.images).max()) == 0.0

    encoded = ours.backend.encode_text(token_ids(ours.tokenizer, ["a red circle", "a cat"]))
    by_text = ours(["a red circle", "a cat"], images, negative_prompt="blurry",
                   generator=torch.Generator().manual_seed(4), **kwargs)  # fmt: skip
    by_embeds = ours(image=images, prompt_embeds=encoded, negative_prompt="blurry",
                     generator=torch.Generator().manual_seed(4), **kwargs)  # fmt: skip
    np.testing.assert_array_equal(by_embeds.images, by_text.images)


@pytest.mark.parametrize("tabulated", [False, True], ids=["eager", "step-graphs-asked"])
def test_ddim_eta_equals_diffusers(tiny, images, tabulated):
    """diffusers' ``eta``: DDIM draws fresh noise each step from the generator, scaled by
    eta. Not tabulated (the table is DDIM's eta 0): asked for step graphs, the eager loop."""
    ours = Img2ImgPipeline.from_components(tiny, scheduler="ddim", show_progress=False)
    if tabulated:
        ours.backend.step_unet = ours.backend.unet  # what --step-graphs gives on a GPU
    reference = diffusers_img2img(tiny, "ddim")
    kwargs = dict(strength=0.8, num_inference_steps=8, guidance_scale=8.0, output_type="np")

    def run(pipe, eta):
        return pipe(["a red circle", "a cat"], images, eta=eta,
                    generator=torch.Generator().manual_seed(9), **kwargs).images  # fmt: skip

    got = run(ours, 0.6)
    assert ours.step_graphs is None  # no table made
    assert float(np.abs(got - run(reference, 0.6)).max()) == 0.0
    still = run(ours, 0.0)
    assert (ours.step_graphs is not None) == tabulated  # eta 0: tabulated where asked
    assert float(np.abs(got - still).max()) > 0.01  # eta changed the image


def test_tcd_gamma_is_eta_and_equals_diffusers(tiny, images):
    """TCD (the scheduler of TCD and Hyper-SD LoRAs) takes diffusers' ``eta`` as its gamma,
    the share of fresh noise per step (0: deterministic, diffusers' pipeline default)."""
    ours = Img2ImgPipeline.from_components(tiny, scheduler="tcd", show_progress=False)
    reference = diffusers_img2img(tiny, "tcd")
    kwargs = dict(strength=0.8, num_inference_steps=4, guidance_scale=1.0, output_type="np")

    def run(pipe, eta):
        return pipe(["a red circle", "a cat"], images, eta=eta,
                    generator=torch.Generator().manual_seed(9), **kwargs).images  # fmt: skip

    for eta in (0.3, 1.0):
        assert float(np.abs(run(ours, eta) - run(reference, eta)).max()) == 0.0, eta
    assert float(np.abs(run(ours, 0.3) - run(ours, 0.0)).max()) > 0.01  # gamma changed it


def test_guidance_at_most_one_runs_batch_b_and_equals_diffusers(tiny, images):
    ours = Img2ImgPipeline.from_components(tiny, show_progress=False)
    batches = []
    unet = ours.backend.unet

    def spy(sample, timestep, hidden):
        batches.append(sample.shape[0])
        return unet(sample, timestep, hidden)

    ours.backend.unet = spy  # type: ignore[method-assign]
    kwargs = dict(strength=0.5, num_inference_steps=6, guidance_scale=1.0, output_type="np")
    got = ours(["a", "b"], images, generator=torch.Generator().manual_seed(1), **kwargs)
    want = diffusers_img2img(tiny, "LMSDiscreteScheduler")(
        ["a", "b"], images, generator=torch.Generator().manual_seed(1), **kwargs
    ).images
    assert batches == [2, 2, 2]
    assert float(np.abs(got.images - want).max()) == 0.0


def test_v_prediction_equals_diffusers(tiny, images):
    components = dict(tiny)
    components["scheduler"] = type(tiny["scheduler"]).from_config(
        tiny["scheduler"].config, prediction_type="v_prediction"
    )
    kwargs = dict(strength=0.8, num_inference_steps=5, guidance_scale=8.0, output_type="np")
    for name in SCHEDULERS:  # the memoised fast paths are epsilon-only: the rest falls back
        ours = Img2ImgPipeline.from_components(components, scheduler=name, show_progress=False)
        assert ours.scheduler.config.prediction_type == "v_prediction"
        got = ours("a", images[0], generator=torch.Generator().manual_seed(5), **kwargs)
        want = diffusers_img2img(components, name)(
            "a", images[0], generator=torch.Generator().manual_seed(5), **kwargs
        ).images
        assert float(np.abs(got.images - want).max()) == 0.0


def test_third_order_unipc_equals_diffusers(tiny, images):
    """Solver order 3 sums two terms with diffusers' einsum (order 2, SD's, multiplies one)."""
    from diffusers import UniPCMultistepScheduler

    components = dict(tiny)
    components["scheduler"] = UniPCMultistepScheduler.from_config(
        tiny["scheduler"].config, solver_order=3
    )
    ours = Img2ImgPipeline.from_components(components, scheduler="unipc", show_progress=False)
    assert ours.scheduler.config.solver_order == 3
    kwargs = dict(strength=1.0, num_inference_steps=8, guidance_scale=8.0, output_type="np")
    got = ours("a", images[0], generator=torch.Generator().manual_seed(7), **kwargs)
    want = diffusers_img2img(components, "UniPCMultistepScheduler")(
        "a", images[0], generator=torch.Generator().manual_seed(7), **kwargs
    ).images
    assert float(np.abs(got.images - want).max()) == 0.0


def test_schedulers_of_one_config_share_their_memo(tiny, images, monkeypatch):
    """The server makes a scheduler per request: a new one starts with the memo of an
    earlier one of the same class, config and schedule (LMS integrates no coefficient
    again) and stays exact; another config keeps a memo of its own."""
    from scipy import integrate

    kwargs = dict(strength=0.75, num_inference_steps=8, guidance_scale=8.0, output_type="np")

    def run(components):
        pipe = Img2ImgPipeline.from_components(components, show_progress=False)
        out = pipe("a", images[0], generator=torch.Generator().manual_seed(3), **kwargs)
        return pipe.scheduler, out.images

    first, _ = run(tiny)
    quad = integrate.quad
    integrals = []
    monkeypatch.setattr(integrate, "quad", lambda *a, **k: integrals.append(1) or quad(*a, **k))
    second, got = run(tiny)
    assert second is not first and second._cache is first._cache and not integrals
    want = diffusers_img2img(tiny, "LMSDiscreteScheduler")(
        "a", images[0], generator=torch.Generator().manual_seed(3), **kwargs
    ).images
    assert float(np.abs(got - want).max()) == 0.0
    other = dict(tiny)
    other["scheduler"] = type(tiny["scheduler"]).from_config(
        tiny["scheduler"].config, beta_end=0.0121
    )
    third, _ = run(other)
    assert third._cache is not first._cache and integrals


def test_lcm_steps_with_memoised_factors(tiny, images, monkeypatch):
    """LCM (LCM-LoRA's scheduler: a few steps, guidance 1 runs the prompt row alone)
    computes its boundary condition's factors once per schedule; a later request with the
    same schedule computes none and still gives diffusers' image."""
    from diffusers import LCMScheduler

    from sdtrt.runtime.scheduler_memo import shared_memo

    # The memo is shared by the whole process: an earlier test with this schedule (the
    # LCM-LoRA one in test_adapters) would have filled it.
    shared_memo.cache_clear()
    kwargs = dict(strength=0.6, num_inference_steps=4, guidance_scale=1.0, output_type="np")
    runs = []
    scalings = LCMScheduler.get_scalings_for_boundary_condition_discrete
    for _ in range(2):
        pipe = Img2ImgPipeline.from_components(tiny, scheduler="lcm", show_progress=False)
        calls: list[int] = []
        monkeypatch.setattr(
            LCMScheduler,
            "get_scalings_for_boundary_condition_discrete",
            lambda self, t, calls=calls: calls.append(int(t)) or scalings(self, t),
        )
        got = pipe("a", images[0], generator=torch.Generator().manual_seed(7), **kwargs)
        monkeypatch.undo()
        runs.append((got, calls))
    (first, first_calls), (second, second_calls) = runs
    assert first.unet_calls == second.unet_calls == 2  # int(4 * 0.6) steps
    assert len(first_calls) == 2 and second_calls == []
    want = diffusers_img2img(tiny, "lcm")(
        "a", images[0], generator=torch.Generator().manual_seed(7), **kwargs
    ).images
    assert float(np.abs(second.images - want).max()) == 0.0


def test_a_diverging_loop_is_an_error_not_a_black_picture(tiny, images):
    """UniPC's bh1 solver diverges on the tiny model, in diffusers too (its image is all NaN,
    saved as black): sdtrt raises NonFiniteOutputError naming the loop, not only the UNet."""
    from sdtrt.errors import NonFiniteOutputError

    components = dict(tiny)
    config = {**tiny["scheduler"].config, "solver_type": "bh1"}
    components["scheduler"] = type(tiny["scheduler"]).from_config(config)
    kwargs = dict(strength=0.8, num_inference_steps=8, output_type="np")
    reference = diffusers_img2img(components, "unipc")
    want = reference(
        "a red circle", images[0], generator=torch.Generator().manual_seed(3), **kwargs
    )
    assert np.isnan(want.images).all()
    ours = Img2ImgPipeline.from_components(components, scheduler="unipc", show_progress=False)
    with pytest.raises(NonFiniteOutputError, match="denoising loop .* scheduler's update"):
        ours("a red circle", images[0], generator=torch.Generator().manual_seed(3), **kwargs)


def test_karras_names_are_their_class_with_karras_sigmas(tiny, images):
    """lms_karras, dpmpp_2m_karras, dpmpp_2m_sde_karras (A1111's "LMS Karras", "DPM++ 2M
    Karras", "DPM++ 2M SDE Karras") are LMS and DPM-Solver++ with Karras sigmas over the
    model's config (the last with its stochastic SDE solver), ddim_trailing DDIM with
    trailing timesteps (Hyper-SD's recipe): another schedule, another image (their equality
    with diffusers' is test_equals_diffusers'). The command line's light name list is this
    one."""
    from sdtrt.options import SCHEDULER_NAMES

    assert SCHEDULER_NAMES == tuple(SCHEDULERS)
    kwargs = dict(strength=0.8, num_inference_steps=8, guidance_scale=8.0, output_type="np")
    karras = {"use_karras_sigmas": True}
    cases = [
        ("lms_karras", "lms", karras),
        ("dpmpp_2m_karras", "dpmpp_2m", karras),
        ("dpmpp_2m_sde_karras", "dpmpp_2m", {**karras, "algorithm_type": "sde-dpmsolver++"}),
        ("ddim_trailing", "ddim", {"timestep_spacing": "trailing"}),
    ]
    for name, plain, settings in cases:
        pipes = [
            Img2ImgPipeline.from_components(tiny, scheduler=n, show_progress=False)
            for n in (name, plain)
        ]
        assert type(pipes[0].scheduler) is type(pipes[1].scheduler)
        for key, value in settings.items():
            assert pipes[0].scheduler.config[key] == value != pipes[1].scheduler.config[key]
        got = [
            p("a", images[0], generator=torch.Generator().manual_seed(2), **kwargs) for p in pipes
        ]
        assert float(np.abs(got[0].images - got[1].images).max()) > 0.01, name


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_equals_diffusers_definition_for_both_prompts(tiny, images, clip_skip):
    """``ModelSource(clip_skip=k)``: diffusers' ``clip_skip`` (``hidden_states[-(k + 1)]``
    through the final layer norm), computed here from the whole text encoder and handed to
    diffusers as embeddings, for the prompt and the negative prompt alike (diffusers' own
    SD 1.x pipeline applies it to the prompt only, and with transformers >= 5.6 fails on
    it: huggingface/diffusers#14124)."""
    from sdtrt.runtime.steps import token_ids
    from sdtrt.source import ModelSource

    ours = Img2ImgPipeline.from_pretrained(
        ModelSource("tiny", clip_skip=clip_skip), scheduler="euler", show_progress=False
    )
    encoder = tiny["text_encoder"]
    assert len(ours.backend.text_encoder.encoder.layers) == len(encoder.encoder.layers) - clip_skip

    def skipped(prompts):
        hidden = encoder(token_ids(tiny["tokenizer"], prompts), output_hidden_states=True)
        return encoder.final_layer_norm(hidden.hidden_states[-(clip_skip + 1)])

    prompts, negatives = ["A colorful dancer, nat geo photo", "a cat"], ["blurry", ""]
    kwargs = dict(strength=0.8, num_inference_steps=6, guidance_scale=7.0, output_type="np")
    got = ours(prompts, images, negative_prompt=negatives,
               generator=torch.Generator().manual_seed(3), **kwargs)  # fmt: skip
    with torch.no_grad():
        embeds, negative = skipped(prompts), skipped(negatives)
    want = diffusers_img2img(tiny, "euler")(
        image=images, prompt_embeds=embeds, negative_prompt_embeds=negative,
        generator=torch.Generator().manual_seed(3), **kwargs,
    ).images  # fmt: skip
    assert got.images.shape == want.shape == (2, 32, 48, 3)
    assert float(np.abs(got.images - want).max()) == 0.0
    every_layer = Img2ImgPipeline.from_components(tiny, scheduler="euler", show_progress=False)
    full = every_layer(prompts, images, negative_prompt=negatives,
                       generator=torch.Generator().manual_seed(3), **kwargs)  # fmt: skip
    assert float(np.abs(full.images - want).max()) > 0.01  # the skip changes the picture
