"""Schedulers by name: diffusers' own classes, built from the model's scheduler config and
normalised exactly as diffusers' Stable Diffusion pipelines normalise old configs."""

from __future__ import annotations

import inspect
from typing import Any

import diffusers
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from sdtrt.errors import InvalidInputError

SCHEDULERS: dict[str, str] = {
    "lms": "LMSDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def make_scheduler(name: str, config: dict[str, Any]) -> SchedulerMixin:
    if name not in SCHEDULERS:
        raise InvalidInputError(
            f"unknown scheduler {name!r}: expected one of {', '.join(SCHEDULERS)}"
        )
    from sdtrt.runtime.fast_schedulers import FAST_SCHEDULERS

    cls = FAST_SCHEDULERS.get(name) or getattr(diffusers, SCHEDULERS[name])
    scheduler = cls.from_config(dict(config))
    normalise_scheduler_config(scheduler)
    return scheduler


def normalise_scheduler_config(scheduler: SchedulerMixin) -> None:
    """The two fixes StableDiffusionImg2ImgPipeline.__init__ applies to old SD configs."""
    updates: dict[str, Any] = {}
    if getattr(scheduler.config, "steps_offset", 1) != 1:
        updates["steps_offset"] = 1
    if getattr(scheduler.config, "clip_sample", False) is True:
        updates["clip_sample"] = False
    if updates:
        scheduler.register_to_config(**updates)


def step_kwargs(scheduler: SchedulerMixin, generator: Any, eta: float = 0.0) -> dict[str, Any]:
    """The keyword arguments diffusers' pipeline passes to ``scheduler.step``: ``eta`` and
    ``generator`` where the scheduler accepts them (stochastic schedulers draw from it)."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs
