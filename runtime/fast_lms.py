"""diffusers' LMS scheduler with its integration coefficients computed once per schedule.

``LMSDiscreteScheduler.step`` integrates each coefficient with ``scipy.integrate.quad`` on
every call (about 3 ms per step on a 2-core CPU, as much as a tiny UNet call). The
coefficients depend only on the sigma schedule, the step index and the order, so they are
memoised per schedule: results are the very same floats, and every later run with the same
number of steps pays nothing.
"""

from __future__ import annotations

from typing import Any

from diffusers import LMSDiscreteScheduler


class CachedLMSDiscreteScheduler(LMSDiscreteScheduler):
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
