"""Checks of the call's arguments, each failing with a message that says what is allowed."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps

from sdtrt.errors import InvalidInputError

DEFAULT_STRENGTH = 0.8  # the seed's start step 10 of 50
# torch.Generator.manual_seed takes an unsigned 64-bit seed; larger ones overflow inside it.
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class Limits:
    """How much work one request may ask for. A request past a limit is refused before any
    work, not left to exhaust memory (a 100000 px square took 24 GB and the kernel's OOM
    killer). The defaults fit SD 1.x/2.x on a 24 GB machine; each can be raised through its
    environment variable. A TensorRT engine's profile bounds its requests further."""

    max_pixels: int = 2048 * 2048
    """height x width per image. Raise with SDTRT_MAX_PIXELS."""
    max_batch: int = 16
    """Images per request (prompts x images per prompt). Raise with SDTRT_MAX_BATCH."""
    max_steps: int = 1000
    """Denoising steps (SD's schedulers have 1000 training steps). SDTRT_MAX_STEPS."""

    @classmethod
    def from_env(cls) -> Limits:
        values = {}
        for name in ("max_pixels", "max_batch", "max_steps"):
            variable = f"SDTRT_{name.upper()}"
            text = os.environ.get(variable)
            if text is None:
                continue
            if not text.isdigit() or int(text) < 1:
                raise InvalidInputError(f"{variable} must be a positive integer, got {text!r}")
            values[name] = int(text)
        return cls(**values)

    def check(self, *, steps: int, batch: int, height: int, width: int) -> None:
        for what, value, limit, variable in (
            ("steps", steps, self.max_steps, "SDTRT_MAX_STEPS"),
            ("images per request", batch, self.max_batch, "SDTRT_MAX_BATCH"),
            (f"{height}x{width} pixels", height * width, self.max_pixels, "SDTRT_MAX_PIXELS"),
        ):
            if value > limit:
                raise InvalidInputError(
                    f"{what} ({value}) is over this machine's limit of {limit}; "
                    f"set {variable} to raise it"
                )


def check_seed(seed: int) -> int:
    """A seed torch's generator takes as it is: an integer in [0, 2^64 - 1]. Outside that
    range it is refused rather than silently reduced, so that a seed always names one image."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InvalidInputError(f"seed must be an integer in [0, 2^64 - 1], got {seed!r}")
    return seed


def check_steps_and_guidance(num_inference_steps: int, guidance_scale: float) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise InvalidInputError(f"steps must be an integer >= 1, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise InvalidInputError(f"steps must be >= 1, got {num_inference_steps}")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise InvalidInputError(f"guidance scale must be a finite number, got {guidance_scale!r}")


def resolve_start_step(
    num_inference_steps: int, strength: float | None, start_step: int | None
) -> int:
    """The index of the first denoising step, from diffusers' ``strength`` or the seed's
    ``start_step`` (the same knob: ``start_step = N - min(int(N * strength), N)``)."""
    n = num_inference_steps
    if strength is not None and start_step is not None:
        raise InvalidInputError("give strength or start step, not both (they are the same knob)")
    if start_step is not None:
        if (
            isinstance(start_step, bool)
            or not isinstance(start_step, int)
            or not 0 <= start_step < n
        ):
            raise InvalidInputError(
                f"start step must be an integer in [0, {n}) for {n} steps, got {start_step!r}"
            )
        return start_step
    if strength is None:
        strength = DEFAULT_STRENGTH
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise InvalidInputError(f"strength must be a number in (0, 1], got {strength!r}")
    if not 0.0 < strength <= 1.0:
        raise InvalidInputError(f"strength must be in (0, 1], got {strength!r}")
    init_timestep = min(int(n * strength), n)
    if init_timestep < 1:
        raise InvalidInputError(
            f"strength {strength} with {n} steps leaves no denoising step: "
            f"strength must be at least 1/{n} = {1 / n:.4g}"
        )
    return n - init_timestep


def check_size(height: int, width: int, multiple: int) -> None:
    """Height and width must be positive multiples of ``multiple`` pixels."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if value % multiple:
            lower = max(multiple, value // multiple * multiple)
            raise InvalidInputError(
                f"{name} {value} is not a multiple of {multiple} px for this model/backend: "
                f"nearest valid sizes are {lower} and {lower + multiple}"
            )


def load_image(path: str | Path) -> PIL.Image.Image:
    """Open an image file fully (so truncated files fail here) and convert it to RGB."""
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"image file {path} does not exist")
    if path.is_dir():
        raise InvalidInputError(f"image path {path} is a directory, expected an image file")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return upright_rgb(image)
    except (OSError, PIL.UnidentifiedImageError, ValueError) as exc:
        raise InvalidInputError(
            f"cannot read {path} as an image ({exc}); expected a PNG, JPEG or other "
            "format Pillow reads"
        ) from exc


def upright_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """A decoded file as diffusers' ``load_image`` gives it: turned by its EXIF orientation
    (cameras and phones store a photo as taken, with a tag saying how to turn it), in RGB.

    One difference: 16-bit grayscale (PNG, TIFF; Pillow's ``I;16`` modes) is scaled to 8
    bits first. Pillow's RGB conversion clips those values at 255, so diffusers turns such a
    picture white but for its darkest 1/256; 16-bit colour files Pillow already scales."""
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16"):
        image = PIL.Image.fromarray(np.round(np.asarray(image) / 257).astype(np.uint8), "L")
    return image.convert("RGB")
