"""What the server's batcher works on: a request as its fields come (``Img2ImgRequest``), the
job it becomes once checked (``Job``: the request's own scheduler, generator, latents and
step index between the worker's iterations) and what it gives back (``JobResult``)."""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import PIL.Image
import torch

from sdtrt.options import SEED_PROMPT, Img2ImgJob
from sdtrt.runtime.clock import span_totals


class ProgressHook(Protocol):
    """A job's progress hook (``Job.progress``)."""

    def __call__(
        self, done: int, steps: int | None, previews: list[PIL.Image.Image] | None = None
    ) -> None: ...


RESIZE_MODES = ("default", "fill", "crop")


@dataclass(frozen=True)
class Img2ImgRequest:
    """One request, its fields named as diffusers' pipeline names them; defaults are the
    CLI's (``Img2ImgJob``). Over HTTP, the fields a request leaves out are the server's
    (``StepBatcher.request_defaults``)."""

    prompt: str | tuple[str, ...] = SEED_PROMPT
    """One prompt, or several (diffusers' list): ``num_images_per_prompt`` images of each,
    in the pipeline's order, from the one image and seed."""
    image: PIL.Image.Image | None = None
    """None: the sample picture that ships with sdtrt."""
    negative_prompt: str | tuple[str, ...] = ""
    """One for every prompt, or one per prompt."""
    strength: float | None = None
    start_step: int | None = None
    num_inference_steps: int = Img2ImgJob.steps
    guidance_scale: float = Img2ImgJob.guidance
    scheduler: str = "lms"
    eta: float = Img2ImgJob.eta
    seed: int = Img2ImgJob.seed
    height: int | None = None
    width: int | None = None
    timesteps: tuple[float, ...] | None = None
    """A schedule of one's own in place of ``num_inference_steps`` (diffusers' ``timesteps``;
    integers)."""
    sigmas: tuple[float, ...] | None = None
    """Or its sigmas (diffusers' ``sigmas``)."""
    guidance_cutoff: float | None = None
    """The share of the steps run under guidance (``GuidanceCutoffCallback``'s ratio); None:
    guided throughout."""
    num_images_per_prompt: int = 1
    """Images of the prompt, drawn from the one seed as diffusers draws a batch (the
    pipeline's images for ``num_images_per_prompt`` and that seed's generator)."""
    emphasis: bool = False
    """Read the prompts' A1111 emphasis, ``(word:1.2)`` (runtime/emphasis.py): what A1111's
    API takes (serve/a1111.py). False: the prompts are plain text, as diffusers reads them."""
    resize_mode: str = "default"
    """How the image comes to ``height`` x ``width`` (diffusers' image processor's modes):
    default stretches it; fill fits it inside, keeping its aspect, and fills the rest from
    its edges; crop fills the size, keeping its aspect, and crops what is over (A1111's
    "Resize and fill" and "Crop and resize")."""


@dataclass
class JobResult:
    images: list[PIL.Image.Image]
    arrays: list[np.ndarray]
    """The images as floats in [0, 1], [H, W, 3] each (what ``output_type="np"`` gives)."""
    seed: int
    unet_calls: int
    queue_wait_ms: float
    timings_ms: dict[str, float]
    """Wall time of the batched calls this job took part in, per stage, and in total."""

    @property
    def image(self) -> PIL.Image.Image:
        """The first image (the only one, for one image per prompt)."""
        return self.images[0]

    @property
    def array(self) -> np.ndarray:
        return self.arrays[0]


@dataclass(eq=False)
class Job:
    request: Img2ImgRequest
    pixels: torch.Tensor
    t_start: int
    deadline: float
    scheduler: Any
    """The job's own scheduler (it keeps the job's state between steps)."""
    schedule: dict[str, list[Any]] = field(default_factory=dict)
    """Custom ``timesteps`` or ``sigmas``, checked (``custom_schedule``); {}: the count's."""
    priority: int = 0
    """Its priority level: 1 the highest (admitted first); 0 where the server has none."""
    progress: ProgressHook | None = None
    """Told (steps done, steps) by the worker after each of the job's steps (a stream's
    events), and (steps done, steps, previews) after those of ``preview_steps``; the steps
    are None when it is queued."""
    preview_steps: frozenset[int] = frozenset()
    """The steps (1 the first run) after which the job's progress is given previews: its
    images as the step estimates them finished (``step_and_estimate``)."""
    estimate: torch.Tensor | None = None
    """The estimate of the step just taken, until the worker has decoded it for a preview."""
    future: Future[JobResult] = field(default_factory=Future)
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    interrupted: bool = False
    # Set when admitted:
    admitted: float = 0.0
    generator: torch.Generator | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    timesteps: Any = None
    host_timesteps: Any = None
    """The scheduler's copy (``start_timesteps`` says why)."""
    index: int = 0
    guided_steps: int | None = None
    """The steps run under guidance (``guided_steps``); None: not admitted yet."""
    latents: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    embeddings: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    spans: list[tuple[str, Any, Any]] = field(default_factory=list)
    """(stage, start mark, end mark) of each batched call the job took part in."""

    @property
    def prompts(self) -> list[str]:
        prompt = self.request.prompt
        return [prompt] if isinstance(prompt, str) else list(prompt)

    @property
    def negative_prompts(self) -> list[str]:
        """One per prompt (``prepare`` made them so)."""
        negative = self.request.negative_prompt
        return [negative] * len(self.prompts) if isinstance(negative, str) else list(negative)

    @property
    def images(self) -> int:
        """Prompts x images per prompt: the pipeline's batch."""
        return len(self.prompts) * self.request.num_images_per_prompt

    @property
    def rows(self) -> int:
        """UNet rows of the next step, per image: [uncond, cond] under guidance, cond alone
        at scale 1 and after the request's guidance cutoff."""
        return self.images * (2 if self.guided else 1)

    @property
    def guided(self) -> bool:
        """Whether the next step runs under guidance."""
        if self.request.guidance_scale <= 1.0:
            return False
        return self.guided_steps is None or self.index < self.guided_steps

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pixels.shape[-2]), int(self.pixels.shape[-1])

    @property
    def same_batch_key(self) -> tuple[Any, ...]:
        """What must match for request-level batching to run jobs as one pipeline batch."""
        r = self.request
        schedule = tuple((name, tuple(values)) for name, values in self.schedule.items())
        steps = (r.num_inference_steps, schedule)
        guidance = (r.guidance_scale, r.guidance_cutoff)
        return (self.size, steps, self.t_start, r.scheduler, guidance, self.images)

    @property
    def done(self) -> bool:
        """Started, and through its steps or interrupted."""
        if self.timesteps is None:
            return False
        return self.interrupted or self.index >= len(self.timesteps)

    def cancel(self) -> None:
        """Drop the job at the next iteration (the client went away)."""
        self.cancelled = True

    def interrupt(self) -> None:
        """Finish the job at the next iteration with the steps it has taken, as diffusers'
        ``pipe._interrupt`` does: the steps left are skipped and the latents decoded as they
        are (A1111's Interrupt and Skip buttons). A job interrupted before its first step
        answers no images."""
        self.interrupted = True

    def timings(self) -> dict[str, float]:
        """Milliseconds per stage, summed over the job's calls; read once the device has
        passed their marks."""
        return span_totals(self.spans)
