"""diffusers schedulers with their per-step scalar work memoised per schedule.

The loop overhead that is left after the UNet is mostly scheduler arithmetic on scalars
that depend only on the sigma schedule. Each class here computes those values exactly as
its diffusers parent does, once, and reuses the very same floats and tensors afterwards:
results stay bit-identical to diffusers (the exactness tests hold them to it).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, LMSDiscreteScheduler, UniPCMultistepScheduler


class CachedLMSDiscreteScheduler(LMSDiscreteScheduler):
    """``LMSDiscreteScheduler.step`` integrates each coefficient with
    ``scipy.integrate.quad`` on every call (about 3 ms a step on a 2-core CPU, as much as a
    tiny UNet call); the coefficients depend only on the sigmas, the step index and the
    order, so they are memoised per schedule."""

    # No __init__ of our own: diffusers' from_config reads the parent's signature.
    _coefficient_caches: dict[bytes, dict[tuple[int, int, int], float]]
    _coefficients: dict[tuple[int, int, int], float]

    def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
        super().set_timesteps(num_inference_steps, device=device)
        if not hasattr(self, "_coefficient_caches"):
            self._coefficient_caches = {}
        key = self.sigmas.numpy().tobytes()
        self._coefficients = self._coefficient_caches.setdefault(key, {})

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        key = (order, t, current_order)
        coefficient = self._coefficients.get(key)
        if coefficient is None:
            coefficient = super().get_lms_coefficient(order, t, current_order)
            self._coefficients[key] = coefficient
        return coefficient


class _MemoisedAlphaSigma:
    """``_sigma_to_alpha_sigma_t`` is called 4-7 times a step by the multistep solvers, each
    time a handful of 0-d tensor ops; its result depends on the sigma's value alone."""

    def _sigma_to_alpha_sigma_t(self, sigma: torch.Tensor) -> Any:
        parent = super()._sigma_to_alpha_sigma_t  # type: ignore[misc]
        if not isinstance(sigma, torch.Tensor) or sigma.device.type != "cpu" or sigma.ndim:
            return parent(sigma)  # reading a GPU value would synchronise: compute instead
        cache: dict[tuple[float, torch.dtype], Any] = self.__dict__.setdefault("_alpha_sigma", {})
        key = (float(sigma), sigma.dtype)
        hit = cache.get(key)
        if hit is None:
            hit = cache[key] = parent(sigma)
        return hit


class CachedDPMSolverMultistepScheduler(_MemoisedAlphaSigma, DPMSolverMultistepScheduler):
    pass


class CachedUniPCMultistepScheduler(_MemoisedAlphaSigma, UniPCMultistepScheduler):
    pass


FAST_SCHEDULERS = {
    "lms": CachedLMSDiscreteScheduler,
    "dpmpp_2m": CachedDPMSolverMultistepScheduler,
    "unipc": CachedUniPCMultistepScheduler,
}
