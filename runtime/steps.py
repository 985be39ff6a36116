"""The pieces of one img2img request that the single-request pipeline and the server's
step-level batcher share: prompts to token ids, the noised start latents, one denoising
step's input and its update. Each is diffusers' own arithmetic, in diffusers' order of
random draws, so both callers stay bit-exact to StableDiffusionImg2ImgPipeline."""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor

logger = logging.getLogger(__name__)


def token_ids(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """[N, 77] token ids, padded and truncated as diffusers does (with a warning); a
    textual inversion token of several vectors stands for all of them."""
    if vectors := multi_vector_tokens(tokenizer):
        return _expanded_ids(tokenizer, prompts, vectors)
    input_ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    # verbose=False: transformers' own "indexing errors" warning; ours below says it.
    longest = tokenizer(prompts, padding="longest", return_tensors="pt", verbose=False).input_ids
    if longest.shape[-1] > input_ids.shape[-1]:
        logger.warning(
            "a prompt is longer than the text encoder's %d tokens and was truncated",
            tokenizer.model_max_length,
        )
    return input_ids


def multi_vector_tokens(tokenizer: Any) -> dict[int, list[int]]:
    """The id of each textual inversion token of several vectors, and the ids of the others
    (TOKEN_1, TOKEN_2..., as diffusers' load_textual_inversion adds them)."""
    added = tokenizer.added_tokens_encoder
    vectors: dict[int, list[int]] = {}
    for token, index in added.items():
        more: list[int] = []
        while (name := f"{token}_{len(more) + 1}") in added:
            more.append(added[name])
        if more:
            vectors[index] = more
    return vectors


def _expanded_ids(tokenizer: Any, prompts: list[str], vectors: dict[int, list[int]]) -> Any:
    """token_ids where a token stands for several: each is followed by its other vectors'
    ids, then the row is truncated (its end token kept) and padded, as the tokenizer does.
    diffusers expands such a token in the prompt's text, matched against the tokenizer's
    pieces, which transformers 5 lower-cases: "EasyNegative" is not found there."""
    size = tokenizer.model_max_length
    rows, truncated = [], False
    for ids in tokenizer(prompts, verbose=False).input_ids:  # start ... end, no padding
        ids = [i for token in ids for i in (token, *vectors.get(token, ()))]
        if len(ids) > size:
            ids, truncated = ids[: size - 1] + ids[-1:], True
        rows.append(ids + [tokenizer.pad_token_id] * (size - len(ids)))
    if truncated:
        logger.warning(
            "a prompt is longer than the text encoder's %d tokens and was truncated", size
        )
    return torch.tensor(rows)


def text_batch(
    cond: torch.Tensor, uncond: torch.Tensor | None, images_per_prompt: int
) -> torch.Tensor:
    """The UNet's text batch as diffusers builds it from each prompt's embeddings (and its
    negative prompt's, under guidance): each prompt's ``images_per_prompt`` times in turn,
    [uncond, cond] under guidance. The pipeline and the server's jobs build it here."""
    rows = cond.repeat_interleave(images_per_prompt, dim=0)
    if uncond is None:
        return rows
    return torch.cat([uncond.repeat_interleave(images_per_prompt, dim=0), rows])


def start_timesteps(
    scheduler: Any,
    num_inference_steps: int,
    t_start: int,
    device: Any,
    schedule: dict[str, Any] | None = None,
) -> Any:
    """The timesteps left after skipping ``t_start`` steps, on ``device`` (the scheduler is
    told where it begins, as diffusers' img2img does); ``schedule``: custom ``timesteps``
    or ``sigmas`` in place of the count. The UNet takes these; the scheduler
    takes each from a host copy (``.cpu()``, once): DDIM and PNDM read a timestep's value,
    which from a GPU tensor would wait for the device at every step."""
    if schedule:
        scheduler.set_timesteps(device=device, **schedule)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    return timesteps


def draw_noise(
    shape: torch.Size, dtype: torch.dtype, device: torch.device, generator: Any
) -> torch.Tensor:
    """diffusers' draw (``randn_tensor``: a CPU generator draws on the CPU), put on a GPU
    without waiting for it: copied from pinned memory, where ``randn_tensor``'s ``.to()``
    from pageable memory waits for every queued kernel. Anything else (no generator, a GPU
    one, a list of them) is ``randn_tensor``'s own."""
    on_cpu = isinstance(generator, torch.Generator) and generator.device.type == "cpu"
    if device.type != "cuda" or not on_cpu:
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    noise = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dtype)
    return noise.pin_memory().to(device, non_blocking=True)


def noised_latents(
    encoded: torch.Tensor,
    vae_samples: bool,
    scaling_factor: float,
    batch_size: int,
    scheduler: Any,
    first_timestep: torch.Tensor,
    generator: torch.Generator | list[torch.Generator] | None,
) -> torch.Tensor:
    """The image's latent, scaled, filling the batch and noised to the first timestep:
    diffusers' draws, in diffusers' order. ``encoded`` is what the VAE encoder gave: with
    ``vae_samples`` a distribution's parameters, sampled here with the caller's generator
    (AutoencoderKL), else the latents themselves (TAESD: no draw). diffusers repeats the
    whole image batch (not each image) to fill the prompt batch: after the sample, or, with
    one generator per image, before it (each image's own draw)."""
    repeats = batch_size // encoded.shape[0]
    if isinstance(generator, list):
        encoded = torch.cat([encoded] * repeats)
        repeats = 1
    if vae_samples:
        distribution = DiagonalGaussianDistribution(encoded)
        encoded = distribution.sample(generator)  # type: ignore[arg-type]  # lists too
    latents = torch.cat([scaling_factor * encoded] * repeats)
    noise = draw_noise(latents.shape, latents.dtype, latents.device, generator)
    return scheduler.add_noise(latents, noise, first_timestep.reshape(1).repeat(batch_size))


def unet_input(scheduler: Any, latents: torch.Tensor, t: Any, do_guidance: bool) -> torch.Tensor:
    """The UNet's rows for one step: [uncond, cond] copies of the latents under guidance."""
    model_input = torch.cat([latents] * 2) if do_guidance else latents
    return scheduler.scale_model_input(model_input, t)


def step(
    scheduler: Any,
    noise_pred: torch.Tensor,
    t: Any,
    latents: torch.Tensor,
    guidance_scale: float,
    extra: dict[str, Any],
) -> torch.Tensor:
    """Classifier-free guidance on the UNet's rows (when there are two per latent), then
    the scheduler's step: the next latents."""
    noise_pred = _guided(noise_pred, latents, guidance_scale)
    return scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]


def step_and_estimate(
    scheduler: Any,
    noise_pred: torch.Tensor,
    t: Any,
    latents: torch.Tensor,
    guidance_scale: float,
    extra: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``step``'s next latents (the same numbers), and the step's estimate of the finished
    latents (x0, what a preview shows): the scheduler's own where it gives one
    (``pred_original_sample`` of LMS, Euler, DDIM; LCM's ``denoised``; the data prediction
    DPM-Solver++ and UniPC keep as their last model output), else the next latents."""
    noise_pred = _guided(noise_pred, latents, guidance_scale)
    output = scheduler.step(noise_pred, t, latents, **extra)
    for name in ("pred_original_sample", "denoised"):
        if (estimate := getattr(output, name, None)) is not None:
            return output.prev_sample, estimate
    config = scheduler.config
    predicts_data = config.get("algorithm_type") in ("dpmsolver++", "sde-dpmsolver++")
    if getattr(scheduler, "model_outputs", None) and (predicts_data or config.get("predict_x0")):
        return output.prev_sample, scheduler.model_outputs[-1]
    return output.prev_sample, output.prev_sample


def _guided(noise_pred: torch.Tensor, latents: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    if noise_pred.shape[0] == 2 * latents.shape[0]:
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
    return noise_pred
