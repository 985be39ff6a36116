"""The worker's warm-up: every shape it can form at the server's warm-up sizes, run once
before ``/ready`` says 200 (``ServeOptions.warmup_sizes`` says which and why)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sdtrt.engine.base import Backend
from sdtrt.errors import ShapeOutsideProfileError
from sdtrt.runtime.steps import token_ids
from sdtrt.serve.jobs import Job


def run_shapes(
    backend: Backend,
    tokenizer: Any,
    jobs: list[Job],
    *,
    max_rows: int,
    max_images: int | None,
    noise: Callable[[Job, torch.Tensor], None],
) -> int:
    """The text encoder, VAE and UNet at every row count the worker can form for ``jobs``
    (one prepared blank picture per size), with the dtypes, devices and layouts of the
    worker's own calls: ``noise`` is its own, which sets a job's latents. How many shapes
    ran."""
    # Prompts are encoded together for all jobs admitted at once (up to max_rows jobs
    # of each size), images per size: in chunks of at most max_images.
    ids = token_ids(tokenizer, [""] * max_rows * len(jobs))
    shapes = warm_counts(backend.encode_text, ids[:max_images])
    hidden = backend.encode_text(ids[:1]).repeat(max_rows, 1, 1)
    timesteps = torch.full((max_rows,), 999.0, device=backend.device)
    for job in jobs:
        pixels = torch.cat([job.pixels] * max_rows).to(backend.device)
        shapes += warm_counts(backend.encode_image, pixels[:max_images])
        noise(job, backend.encode_image(pixels[:1]))
        latents = torch.cat([job.latents] * max_rows)
        shapes += warm_counts(backend.unet, latents, timesteps, hidden)
        shapes += warm_counts(backend.decode_latents, latents[:max_images])
    backend.synchronize()
    return shapes


def warm_counts(call: Callable[..., Any], *batched: torch.Tensor) -> int:
    """``call`` on the first n rows of ``batched``, for each n up to their length but
    those the backend refuses (sdtrt's TensorRT engines pad a call of fewer rows than
    their profile takes, a static one's included: a backend of one's own may not); how
    many ran. Sizes outside the profiles never get here: ``prepare`` refused them."""
    ran = 0
    for n in range(1, len(batched[0]) + 1):
        try:
            call(*(tensor[:n] for tensor in batched))
            ran += 1
        except ShapeOutsideProfileError:
            continue
    return ran
