"""Schedulers by name: diffusers' own classes, built from the model's scheduler config and
normalised exactly as diffusers' Stable Diffusion pipelines normalise old configs."""

from __future__ import annotations

import inspect
import logging
from typing import Any

import diffusers
import numpy as np
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from sdtrt.errors import InvalidInputError

logger = logging.getLogger(__name__)

# runtime/fast_schedulers.py and fast_multistep.py override private diffusers methods. Their
# classes are used only on the diffusers releases whose exactness tests
# (tests/test_exactness.py: 0.0 difference from diffusers' own pipeline, every named
# scheduler) were run; elsewhere diffusers' own classes run, with a log line. Add a release
# here after running those tests on it.
PROVEN_DIFFUSERS = ("0.42.1",)

SCHEDULERS: dict[str, str] = {
    "lms": "LMSDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lms_karras": "LMSDiscreteScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde_karras": "DPMSolverMultistepScheduler",
    "ddim_trailing": "DDIMScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
}
# Names that are a class with settings over the model's config: A1111's "LMS Karras",
# "DPM++ 2M Karras" and "DPM++ 2M SDE Karras", as diffusers' scheduler docs build them, and
# DDIM on timesteps that start at the last training timestep (Hyper-SD's few-step LoRAs'
# recipe).
SETTINGS: dict[str, dict[str, Any]] = {
    "lms_karras": {"use_karras_sigmas": True},
    "dpmpp_2m_karras": {"use_karras_sigmas": True},
    "dpmpp_2m_sde_karras": {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
    "ddim_trailing": {"timestep_spacing": "trailing"},
}


def check_scheduler(name: str) -> None:
    if name not in SCHEDULERS:
        raise InvalidInputError(
            f"unknown scheduler {name!r}: expected one of {', '.join(SCHEDULERS)}"
        )


def scheduler_class(name: str) -> type[Any]:
    """diffusers' own class for sdtrt's scheduler ``name``."""
    check_scheduler(name)
    cls: type[Any] = getattr(diffusers, SCHEDULERS[name])
    return cls


# diffusers' schedulers that cannot step a model predicting the clean sample (its
# config's prediction_type "sample"): they raise at the first step, after the prompts and
# the image were encoded. The others take all three kinds.
_PREDICTIONS = {
    diffusers.PNDMScheduler: ("epsilon", "v_prediction"),
    diffusers.EulerAncestralDiscreteScheduler: ("epsilon", "v_prediction"),
}


def check_scheduler_fits(cls: type, config: Any, steps: int) -> None:
    """What diffusers' scheduler ``cls`` would refuse only once the loop has begun, refused
    before any network: DDIM past the model's training timesteps, LCM and TCD past their
    distillation schedule (ValueErrors in ``set_timesteps``), a prediction type the
    scheduler cannot step."""
    train = config.get("num_train_timesteps", 1000)
    if issubclass(cls, diffusers.DDIMScheduler) and steps > train:
        raise InvalidInputError(
            f"ddim takes at most {train} steps (the model's training timesteps), got {steps}"
        )
    if issubclass(cls, _DISTILLED):
        # Their steps are a subset of the distillation's schedule of original_inference_steps
        # (the class's default, unless the model's config names its own).
        default = inspect.signature(cls).parameters["original_inference_steps"].default
        most = min(config.get("original_inference_steps") or default, train)
        if steps > most:
            raise InvalidInputError(
                f"{_diffusers_name(cls)} takes at most {most} steps (its schedule is a subset "
                f"of the {most} steps it was distilled with), got {steps}"
            )
    prediction = config.get("prediction_type", "epsilon")
    if not _steps(cls, prediction):
        usable = [name for name in SCHEDULERS if _steps(scheduler_class(name), prediction)]
        raise InvalidInputError(
            f"{_diffusers_name(cls)} cannot step this model, which predicts {prediction!r}: "
            f"choose another scheduler ({', '.join(usable)})"
        )


# The consistency-distilled models' schedulers (LCM-LoRA, TCD and Hyper-SD LoRAs).
_DISTILLED = (diffusers.LCMScheduler, diffusers.TCDScheduler)


def _diffusers_base(cls: type) -> Any:
    """diffusers' own class of a scheduler class, ours (runtime/fast_schedulers.py)
    included: what it is named and takes."""
    return next(c for c in cls.__mro__ if c.__module__.startswith("diffusers."))


def _diffusers_name(cls: type) -> str:
    """diffusers' name for a scheduler class, ours included."""
    return str(_diffusers_base(cls).__name__)


def _steps(cls: type, prediction: str) -> bool:
    return all(prediction in takes for base, takes in _PREDICTIONS.items() if issubclass(cls, base))


def custom_schedule(
    scheduler: Any, model_config: Any, timesteps: Any, sigmas: Any
) -> tuple[dict[str, list[Any]], int]:
    """diffusers' ``timesteps`` or ``sigmas`` (a schedule of one's own, such as Align Your
    Steps') as the keyword ``scheduler.set_timesteps`` takes, set on ``scheduler``, and its
    steps as diffusers counts them (the scheduler's timesteps: a sigma schedule ends at its
    last sigma, one fewer); ({}, 0) where neither is given. Refused: both; anything but a
    non-empty list of finite numbers, timesteps integers within the model's training
    steps; a scheduler that takes no such schedule or refuses this one (named with those
    that take it, as made from ``model_config``, the model's own scheduler config)."""
    if timesteps is None and sigmas is None:
        return {}, 0
    if timesteps is not None and sigmas is not None:
        raise InvalidInputError("give timesteps or sigmas, not both")
    name, values = ("timesteps", timesteps) if timesteps is not None else ("sigmas", sigmas)
    array = values.detach().cpu().numpy() if hasattr(values, "detach") else values
    try:
        array = np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError):
        array = np.asarray([np.nan])
    if array.ndim != 1 or not len(array) or not np.isfinite(array).all():
        raise InvalidInputError(
            f"{name} must be a non-empty list of finite numbers, got {values!r}"
        )
    if (np.diff(array) >= 0).any():
        raise InvalidInputError(
            f"{name} must be in descending order (the noisiest first), got {array.tolist()}"
        )
    if name == "timesteps":
        steps = scheduler.config.num_train_timesteps
        if (array != np.round(array)).any() or array.min() < 0 or array.max() >= steps:
            raise InvalidInputError(
                f"timesteps must be integers in [0, {steps}) (the model's training steps), "
                f"got {array.tolist()}"
            )
        schedule: dict[str, list[Any]] = {name: [int(t) for t in array]}
    else:
        if array.min() < 0:
            raise InvalidInputError(f"sigmas must be >= 0, got {array.tolist()}")
        schedule = {name: [float(sigma) for sigma in array]}
    problem = f"takes no custom {name}"
    if name in _set_timesteps_parameters(type(scheduler)):
        try:
            scheduler.set_timesteps(device="cpu", **schedule)
            return schedule, len(scheduler.timesteps)
        except ValueError as exc:
            problem = f"refuses these {name} ({exc})"
    takers = ", ".join(_takers(schedule, model_config)) or "none"
    raise InvalidInputError(
        f"{_diffusers_name(type(scheduler))} {problem}; the schedulers that take them: {takers}"
    )


def _takers(schedule: dict[str, list[Any]], config: Any) -> list[str]:
    """The named schedulers that take ``schedule`` for this model, found by setting it."""
    from diffusers.utils import logging as diffusers_logging

    takers = []
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # LCM warns of timesteps off its grid
    try:
        for name in SCHEDULERS:
            cls = scheduler_class(name)
            if next(iter(schedule)) not in _set_timesteps_parameters(cls):
                continue
            try:
                cls.from_config(_taken_by(cls, config), **SETTINGS.get(name, {})).set_timesteps(
                    **schedule
                )
            except ValueError:
                continue
            takers.append(name)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return takers


def _set_timesteps_parameters(cls: type) -> set[str]:
    """The parameters of the diffusers class's ``set_timesteps`` (ours pass theirs on)."""
    return set(inspect.signature(_diffusers_base(cls).set_timesteps).parameters)


def make_scheduler(name: str, config: dict[str, Any]) -> SchedulerMixin:
    cls = scheduler_class(name)
    if fast_schedulers_proven():
        from sdtrt.runtime.fast_schedulers import FAST_SCHEDULERS

        cls = FAST_SCHEDULERS[SCHEDULERS[name]]
    scheduler = cls.from_config(_taken_by(cls, config), **SETTINGS.get(name, {}))
    normalise_scheduler_config(scheduler)
    return scheduler


def _taken_by(cls: type, config: Any) -> dict[str, Any]:
    """The model's scheduler config without the settings ``cls`` does not take (PNDM's
    ``skip_prk_steps``...): ``from_config`` ignores them anyway, but warns of each one where
    the config names no class of its own (sdtrt's built-in models) and ``cls`` lists
    none of SD's schedulers as compatible (LCM, TCD): a warning about nothing on every
    request."""
    takes = inspect.signature(cls).parameters
    return {key: value for key, value in config.items() if key.startswith("_") or key in takes}


def diffusers_scheduler(name: str, config: Any) -> SchedulerMixin:
    """diffusers' own class for ``name``, built as a diffusers user builds it (the
    reference the bench and the exactness tests compare with)."""
    return scheduler_class(name).from_config(config, **SETTINGS.get(name, {}))


def fast_schedulers_proven(version: str | None = None) -> bool:
    """Whether sdtrt's memoised schedulers were proven exact on this diffusers release."""
    version = version or diffusers.__version__
    if version in PROVEN_DIFFUSERS:
        return True
    if not _warned:
        _warned.append(version)
        logger.info(
            "diffusers %s is not one the fast schedulers were proven on (%s): using "
            "diffusers' own scheduler classes (same images, more Python per step)",
            version,
            ", ".join(PROVEN_DIFFUSERS),
        )
    return False


_warned: list[str] = []


def normalise_scheduler_config(scheduler: Any) -> None:
    """The two fixes StableDiffusionImg2ImgPipeline.__init__ applies to old SD configs."""
    updates: dict[str, Any] = {}
    if getattr(scheduler.config, "steps_offset", 1) != 1:
        updates["steps_offset"] = 1
    if getattr(scheduler.config, "clip_sample", False) is True:
        updates["clip_sample"] = False
    if updates:
        scheduler.register_to_config(**updates)


def step_kwargs(scheduler: Any, generator: Any, eta: float = 0.0) -> dict[str, Any]:
    """The keyword arguments diffusers' pipeline passes to ``scheduler.step``: ``eta`` and
    ``generator`` where the scheduler accepts them (stochastic schedulers draw from it)."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generator
    return kwargs
