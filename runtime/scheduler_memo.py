"""The memo that sdtrt's schedulers (fast_schedulers.py, fast_multistep.py) keep their
per-step values in: one per class, config and timestep schedule, shared by every scheduler
with them, and the mixins that memoise what several schedulers compute alike.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    # The mixins below are used on top of diffusers' scheduler classes and use their
    # attributes (sigmas, step_index, config...), which diffusers sets dynamically; to the
    # type checker they are typed as diffusers' own: Any.
    Scheduler = Any
else:
    Scheduler = object


@functools.lru_cache(maxsize=64)
def shared_memo(key: tuple[Any, ...]) -> dict[Any, Any]:
    """The memo of one class, config and schedule, shared by every scheduler with them (the
    64 most recently used): the server makes a scheduler per request, and each would
    otherwise start cold (LMS integrates its coefficients with scipy again: about 3 ms a
    step on a 2-core CPU)."""
    return {}


class PerScheduleCache(Scheduler):
    """One memo per timestep schedule, chosen in ``set_timesteps``: values computed for a
    schedule are reused by every later run with the same schedule, on this scheduler and on
    any other of the same class and config. No ``__init__``: diffusers' ``from_config``
    reads the scheduler's own signature."""

    _cache: dict[Any, Any]

    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        super().set_timesteps(*args, **kwargs)
        schedule = getattr(self, "sigmas", None)
        if schedule is None:  # DDIM: its schedule is the timesteps and their count
            schedule = self.timesteps
        steps = self.num_inference_steps
        config = tuple(sorted((name, repr(value)) for name, value in self.config.items()))
        key = (type(self), config, schedule.cpu().numpy().tobytes(), steps, str(schedule.device))
        self._cache = shared_memo(key)

    def _memoised(self, key: Any, compute: Any) -> Any:
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = compute()
        return value


class MemoisedInputScale(Scheduler):
    """LMS, Euler and Euler A divide the UNet input by ``(sigma**2 + 1) ** 0.5`` every step:
    three 0-d tensor ops whose result depends only on the step index."""

    def scale_model_input(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        if self.step_index is None:
            self._init_step_index(timestep)
        index = self.step_index
        divisor = self._memoised(
            ("input_scale", index),
            lambda: (self.sigmas[index] ** 2 + 1) ** 0.5,
        )
        self.is_scale_input_called = True
        return sample / divisor


class MemoisedAlphaSigma(PerScheduleCache):
    """``_sigma_to_alpha_sigma_t`` is called 4-7 times a step by the multistep solvers, each
    time a handful of 0-d tensor ops; its result depends on the sigma's value alone."""

    def _sigma_to_alpha_sigma_t(self, sigma: torch.Tensor) -> Any:
        parent = super()._sigma_to_alpha_sigma_t
        if (
            not isinstance(sigma, torch.Tensor)
            or sigma.device.type != "cpu"  # reading a GPU value would synchronise
            or sigma.ndim
            or not hasattr(self, "_cache")  # before set_timesteps: no schedule yet
        ):
            return parent(sigma)
        return self._memoised(("alpha_sigma", float(sigma), sigma.dtype), lambda: parent(sigma))
