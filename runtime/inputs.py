"""Checks of the call's arguments, each failing with a message that says what is allowed."""

from __future__ import annotations

import logging
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import PIL.ImageOps

from sdtrt.errors import InvalidInputError
from sdtrt.options import DEFAULT_STRENGTH

if TYPE_CHECKING:
    import torch

    from sdtrt.engine.trt_profile import PixelRange

logger = logging.getLogger(__name__)

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
            (f"{width}x{height} pixels", height * width, self.max_pixels, "SDTRT_MAX_PIXELS"),
        ):
            if value > limit:
                # An image's size is the output's unless height and width are given: a
                # phone photo (4000x3000) is over the limit as it comes.
                smaller = (
                    "ask for a smaller height and width (without them the output takes the "
                    "input image's size), or "
                ) * (variable == "SDTRT_MAX_PIXELS")
                raise InvalidInputError(
                    f"{what} ({value}) is over this machine's limit of {limit}; "
                    f"{smaller}set {variable} to raise it"
                )


def is_integer(value: Any) -> bool:
    """An integer, Python's or numpy's (``np.int64`` from a sweep); not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def is_real(value: Any) -> bool:
    """A real number, Python's or numpy's (``np.float32``); not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def check_seed(seed: int) -> int:
    """A seed torch's generator takes as it is: an integer in [0, 2^64 - 1]. Outside that
    range it is refused rather than silently reduced, so that a seed always names one image."""
    if not is_integer(seed) or not 0 <= seed <= MAX_SEED:
        raise InvalidInputError(f"seed must be an integer in [0, 2^64 - 1], got {seed!r}")
    return int(seed)


def check_steps_and_guidance(num_inference_steps: int, guidance_scale: float) -> None:
    if not is_integer(num_inference_steps):
        raise InvalidInputError(f"steps must be an integer >= 1, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise InvalidInputError(f"steps must be >= 1, got {num_inference_steps}")
    if not is_real(guidance_scale) or not math.isfinite(guidance_scale):
        raise InvalidInputError(f"guidance scale must be a finite number, got {guidance_scale!r}")


def check_eta(eta: float) -> None:
    """DDIM's ``eta`` (TCD's gamma): the share of its per-step noise, in [0, 1] (0:
    deterministic)."""
    if not is_real(eta) or not 0 <= eta <= 1:
        raise InvalidInputError(
            f"eta must be a number in [0, 1] (DDIM's noise, TCD's gamma), got {eta!r}"
        )


def resolve_start_step(
    num_inference_steps: int, strength: float | None, start_step: int | None
) -> int:
    """The index of the first denoising step, from diffusers' ``strength`` or the seed's
    ``start_step`` (the same knob: ``start_step = N - min(int(N * strength), N)``)."""
    n = num_inference_steps
    if strength is not None and start_step is not None:
        raise InvalidInputError("give strength or start step, not both (they are the same knob)")
    if start_step is not None:
        if not is_integer(start_step) or not 0 <= start_step < n:
            raise InvalidInputError(
                f"start step must be an integer in [0, {n}) for {n} steps, got {start_step!r}"
            )
        return int(start_step)
    if strength is None:
        strength = DEFAULT_STRENGTH
    if not is_real(strength):
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
        if not is_integer(value) or value <= 0:
            raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")
        if value % multiple:
            lower = max(multiple, value // multiple * multiple)
            raise InvalidInputError(
                f"{name} {value} is not a multiple of {multiple} px for this model/backend: "
                f"nearest valid sizes are {lower} and {lower + multiple}"
            )


def load_image(path: str | Path) -> PIL.Image.Image:
    """Open an image file fully (so truncated files fail here) and convert it to RGB."""
    if str(path).startswith(("http://", "https://")):
        raise InvalidInputError(
            f"{path}: sdtrt reads local image files and downloads nothing; fetch it first"
        )
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
    return eight_bit(PIL.ImageOps.exif_transpose(image)).convert("RGB")


def eight_bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """16-bit grayscale (Pillow's ``I;16`` modes) as 8-bit grayscale; others as they are."""
    if not image.mode.startswith("I;16"):
        return image
    return PIL.Image.fromarray(np.round(np.asarray(image) / 257).astype(np.uint8), "L")


IMAGE_KINDS = (
    "a PIL image, a float numpy array [H, W, 3] or [B, H, W, 3] in [0, 1], a float torch "
    "tensor [3, H, W] or [B, 3, H, W] in [0, 1] (or diffusers' older [-1, 1]), or a list "
    "of one of these kinds"
)


def image_input(image: Any) -> Any:
    """The pipeline's ``image`` argument checked against what diffusers' image processor
    takes (``IMAGE_KINDS``), so that a wrong one fails with that list rather than deep in a
    network or with a silently wrong picture (uint8 arrays read as [0, 255] floats); PIL
    images in 16-bit grayscale come back scaled to 8 bits, as files are read."""
    import torch  # here: the command line checks its options with this module, torch unloaded

    items = image if isinstance(image, list) else [image]
    if not items:
        raise InvalidInputError(f"image is an empty list; expected {IMAGE_KINDS}")
    kinds = {type(item) for item in items}
    if len(kinds) > 1:
        raise InvalidInputError(f"image mixes kinds in one list; expected {IMAGE_KINDS}")
    if isinstance(items[0], PIL.Image.Image):
        for item in items:
            if item.width < 1 or item.height < 1:
                raise InvalidInputError(f"image is {item.width}x{item.height} pixels: empty")
        converted = [eight_bit(item) for item in items]
        return converted if isinstance(image, list) else converted[0]
    if not isinstance(items[0], np.ndarray | torch.Tensor):
        name = "None" if image is None else type(items[0]).__name__
        hint = ""
        if isinstance(items[0], str | os.PathLike):  # the CLI's --image habit
            hint = (
                "; a file name is opened by the caller: image=diffusers.utils.load_image(path) "
                "(turned by its EXIF orientation, in RGB)"
            )
        raise InvalidInputError(f"image is {name}; expected {IMAGE_KINDS}{hint}")
    for item in items:
        _check_pixel_array(item, items[0].shape)
    return image


def latents_input(image: Any, channels: int) -> Any:
    """``image`` as latents, where it is one torch tensor ``[channels, h, w]`` or ``[B,
    channels, h, w]`` (the model's latent channels: what ``output_type="latent"`` gives,
    scaled as the UNet sees them), which diffusers' img2img takes as the image's latents
    and does not encode; None for anything else (pixels, or a wrong kind ``image_input``
    then names). Checked: floats, not empty, finite."""
    import torch

    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4):
        return None
    if image.shape[-3] != channels:
        return None
    latents = image if image.ndim == 4 else image[None]
    if 0 in latents.shape or not latents.is_floating_point():
        raise InvalidInputError(
            f"image is a {channels}-channel tensor of {latents.dtype}, shape "
            f"{list(image.shape)}: latents must be floats [B, {channels}, h, w], not empty"
        )
    if not torch.isfinite(latents).all():
        raise InvalidInputError("image (latents) holds NaN or infinite values")
    return latents


def check_generator(generator: Any, batch_size: int) -> None:
    """None, a ``torch.Generator``, or diffusers' list of one per image of the batch (image
    i draws from generator i)."""
    import torch

    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, list) or not all(
        isinstance(item, torch.Generator) for item in generator
    ):
        raise InvalidInputError(
            f"generator is {type(generator).__name__}; expected a torch.Generator, a list of "
            "one per image, or None"
        )
    if len(generator) != batch_size:
        raise InvalidInputError(
            f"{len(generator)} generators for a batch of {batch_size} images (prompts x images "
            "per prompt): give one generator, or one per image"
        )


def _check_pixel_array(item: Any, shape: tuple[int, ...]) -> None:
    """One numpy array or torch tensor of pixels: its layout, a float dtype, values in
    range (NaN is not)."""
    if isinstance(item, np.ndarray):
        what, layout, span, low = "numpy array", "[H, W, 3] or [B, H, W, 3]", "[0, 1]", 0.0
        channels, floating = item.shape[-1:], np.issubdtype(item.dtype, np.floating)
    else:
        what, layout, low = "torch tensor", "[3, H, W] or [B, 3, H, W]", -1.0
        span = "[0, 1] (or [-1, 1])"
        channels, floating = item.shape[-3:-2], item.is_floating_point()
    if item.ndim not in (3, 4) or tuple(channels) != (3,) or 0 in item.shape:
        latents = what == "torch tensor" and tuple(channels) == (4,)
        hint = " (latents: one tensor [B, 4, h, w], not a list)" if latents else ""
        raise InvalidInputError(
            f"image is a {what} of shape {list(item.shape)}; expected {layout}{hint}"
        )
    if tuple(item.shape) != tuple(shape):
        raise InvalidInputError(
            f"image lists {what}s of shapes {list(shape)} and {list(item.shape)}: give one shape"
        )
    if not floating:
        raise InvalidInputError(
            f"image is a {what} of {item.dtype}; expected floats in {span} "
            "(8-bit pixels: divide by 255, or pass a PIL image)"
        )
    smallest, largest = float(item.min()), float(item.max())  # NaN where there is one
    if not (low <= smallest and largest <= 1.0):  # NaN fails both
        raise InvalidInputError(
            f"image values span [{smallest:g}, {largest:g}]; a {what} takes {span}"
        )


@dataclass(frozen=True)
class CallPlan:
    """What a call's numbers, schedule and image come to, checked before any network runs
    (``Img2ImgPipeline.plan``): the pipeline's call and the server's requests run these."""

    steps: int
    """Scheduled steps: the count asked for, or a custom schedule's own."""
    start_step: int
    """The first step run (from ``strength`` or ``start_step``)."""
    schedule: dict[str, list[Any]]
    """Custom ``timesteps`` or ``sigmas`` as ``set_timesteps`` takes them; {}: the count's."""
    images_per_prompt: int
    batch_size: int
    """Prompts x images per prompt: the images the call makes."""
    height: int
    width: int
    image: Any
    """The image as checked (``image_input``); None where latents were given."""
    latents: torch.Tensor | None
    """Latents given as the image (``latents_input``), not encoded; else None."""


def image_size(image: Any) -> tuple[int, int]:
    """(height, width) of what diffusers' image processor takes: a PIL image, an HWC/NHWC
    array, a CHW/NCHW tensor, or a list of them (the first one's)."""
    first = image[0] if isinstance(image, list) and image else image
    if isinstance(first, PIL.Image.Image):
        return first.height, first.width
    import torch  # here: the command line checks its options with this module, torch unloaded

    shape = tuple(first.shape)
    if isinstance(first, torch.Tensor):
        return int(shape[-2]), int(shape[-1])
    return (int(shape[0]), int(shape[1])) if len(shape) == 3 else (int(shape[1]), int(shape[2]))


def output_size(
    image: Any,
    height: int | None,
    width: int | None,
    multiple: int,
    pixel_range: PixelRange | None,
) -> tuple[int, int]:
    """The size asked for (a multiple of ``multiple`` px, the backend's unit), else
    diffusers' rule: the image's own size, rounded down to that unit, with a note when that
    resizes it. A size outside ``pixel_range`` (the engines' profiles) is refused here,
    before any work."""
    from sdtrt.engine.trt_profile import check_pixels  # here: it loads torch (image_size says)

    own = None
    if height is None or width is None:
        own = image_size(image)
        if height is None:
            height = max(multiple, own[0] // multiple * multiple)
        if width is None:
            width = max(multiple, own[1] // multiple * multiple)
    check_size(height, width, multiple)
    height, width = int(height), int(width)  # numpy's integers too
    check_pixels(height, width, pixel_range)
    if own is not None and (height, width) != own:
        logger.info(
            "the %dx%d input image is resized to %dx%d (sizes are multiples of %d px here)",
            own[1],
            own[0],
            width,
            height,
            multiple,
        )
    return height, width


def latents_size(
    latents: torch.Tensor,
    height: int | None,
    width: int | None,
    factor: int,
    multiple: int,
    pixel_range: PixelRange | None,
) -> tuple[int, int]:
    """The picture's size that latents given as the image decode to (``factor``: the VAE's
    scale); they are not resized: a height or width given must be that size. Refused where
    the size is not a multiple of ``multiple`` or outside ``pixel_range``."""
    from sdtrt.engine.trt_profile import check_pixels

    size = (latents.shape[-2] * factor, latents.shape[-1] * factor)
    asked = (
        size[0] if height is None else height,
        size[1] if width is None else width,
    )
    if asked != size:
        raise InvalidInputError(
            f"latents of {latents.shape[-1]}x{latents.shape[-2]} are a {size[1]}x{size[0]} "
            f"picture, not {asked[1]}x{asked[0]}: latents given as the image are not "
            "resized (leave height and width out)"
        )
    check_size(*size, multiple)
    check_pixels(*size, pixel_range)
    return size
