"""A request checked whole and made a job, before it takes a place in the queue: what the
server's intake thread does for each request (the worker takes only jobs that can run).
Every check is the library's (the pipeline's plan, its image processor); the server adds
its own bound on UNet rows and takes a picture, not latents."""

from __future__ import annotations

from dataclasses import replace

import PIL.Image
import torch

from sdtrt.errors import InvalidInputError
from sdtrt.options import SAMPLE_IMAGE, one_of
from sdtrt.runtime.emphasis import parse_emphasis
from sdtrt.runtime.guidance import check_guidance_cutoff
from sdtrt.runtime.inputs import check_seed, is_integer, is_real, load_image
from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.runtime.prompts import prompt_lists
from sdtrt.runtime.schedulers import make_scheduler
from sdtrt.serve.admission import check_rows
from sdtrt.serve.jobs import RESIZE_MODES, Img2ImgRequest, Job


def checked_job(
    pipeline: Img2ImgPipeline, request: Img2ImgRequest, max_rows: int, deadline: float, level: int
) -> Job:
    """``request`` as a job of ``pipeline``'s, its image preprocessed, due by ``deadline``
    (``time.monotonic()``'s) at priority ``level``; InvalidInputError naming what is allowed
    where it cannot run, or would take more than ``max_rows`` UNet rows."""
    check_seed(request.seed)
    check_guidance_cutoff(request.guidance_cutoff)
    prompts, negatives = prompt_lists(request.prompt, request.negative_prompt)
    if request.emphasis:  # what it refuses (BREAK), refused here, not in the worker
        for text in (*prompts, *negatives):
            parse_emphasis(text)
    if is_integer(request.num_images_per_prompt) and is_real(request.guidance_scale):
        # The server's bound first: past it, raising the machine's limits would not help.
        images = len(prompts) * request.num_images_per_prompt
        check_rows(images, request.guidance_scale, max_rows)
    scheduler = make_scheduler(request.scheduler, pipeline.model_scheduler_config)
    image = request.image if request.image is not None else load_image(SAMPLE_IMAGE)
    plan = pipeline.plan(
        image,
        scheduler,
        prompts=len(prompts),
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        strength=request.strength,
        start_step=request.start_step,
        timesteps=request.timesteps,
        sigmas=request.sigmas,
        eta=request.eta,
        num_images_per_prompt=request.num_images_per_prompt,
        height=request.height,
        width=request.width,
    )
    if plan.latents is not None:
        raise InvalidInputError("a request's image is a picture: the server takes no latents")
    one_of("resize_mode", request.resize_mode, RESIZE_MODES)
    if request.resize_mode != "default" and not isinstance(plan.image, PIL.Image.Image):
        raise InvalidInputError("resize_mode fill and crop take a picture, not an array")
    pixels = pipeline.image_processor.preprocess(
        plan.image, height=plan.height, width=plan.width, resize_mode=request.resize_mode
    )
    if len(pixels) != 1:
        raise InvalidInputError(
            f"a request takes one image, got {len(pixels)}: send one request per image"
        )
    # The plan's steps, integers Python's (a request may hold numpy's).
    request = replace(
        request,
        prompt=tuple(prompts),
        negative_prompt=tuple(negatives),
        num_inference_steps=plan.steps,
        num_images_per_prompt=plan.images_per_prompt,
    )
    pixels = pixels.to(torch.float32)
    return Job(request, pixels, plan.start_step, deadline, scheduler, plan.schedule, level)
