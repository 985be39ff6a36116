"""diffusers schedulers with their per-step scalar work memoised per schedule.

The loop overhead that is left after the UNet is mostly scheduler arithmetic on scalars
that depend only on the sigma schedule. Each class here computes those values exactly as
its diffusers parent does, once, and reuses the very same floats and tensors afterwards:
results stay bit-identical to diffusers (the exactness tests hold them to it).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    TCDScheduler,
)
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
    EulerAncestralDiscreteSchedulerOutput,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput

from sdtrt.runtime.fast_multistep import (
    CachedDPMSolverMultistepScheduler,
    CachedUniPCMultistepScheduler,
)
from sdtrt.runtime.scheduler_memo import MemoisedInputScale, PerScheduleCache
from sdtrt.runtime.steps import draw_noise


class CachedLMSDiscreteScheduler(PerScheduleCache, MemoisedInputScale, LMSDiscreteScheduler):
    """``LMSDiscreteScheduler.step`` integrates each coefficient with
    ``scipy.integrate.quad`` on every call (about 3 ms a step on a 2-core CPU, as much as a
    tiny UNet call); the coefficients depend only on the sigmas, the step index and the
    order, so they are memoised per schedule."""

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        compute = super().get_lms_coefficient
        return self._memoised((order, t, current_order), lambda: compute(order, t, current_order))


class CachedDDIMScheduler(PerScheduleCache, DDIMScheduler):
    """DDIM's deterministic step (eta 0, epsilon prediction, no clipping): its four 0-d
    factors depend only on the timestep and the number of steps. Memoised; any other
    setting runs diffusers' own step."""

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Any:
        config = self.config
        if (
            eta != 0.0
            or use_clipped_model_output
            or variance_noise is not None
            or config.thresholding
            or config.clip_sample
            or config.prediction_type != "epsilon"
            or self.num_inference_steps is None
        ):
            return super().step(
                model_output,
                timestep,
                sample,
                eta,
                use_clipped_model_output,
                generator,
                variance_noise,
                return_dict,
            )
        root_beta, root_alpha, direction, root_alpha_prev = self._memoised(
            int(timestep), lambda: self._step_factors(timestep, eta)
        )
        pred_original_sample = (sample - root_beta * model_output) / root_alpha
        prev_sample = root_alpha_prev * pred_original_sample + direction * model_output
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return DDIMSchedulerOutput(
            prev_sample=prev_sample, pred_original_sample=pred_original_sample
        )

    def _step_factors(self, timestep: int | torch.Tensor, eta: float) -> tuple[torch.Tensor, ...]:
        # diffusers' operations, in its order.
        prev_timestep = timestep - self.config.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = (
            self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        )
        beta_prod_t = 1 - alpha_prod_t
        variance = self._get_variance(timestep, prev_timestep)
        std_dev_t = eta * variance ** (0.5)
        direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5)
        return beta_prod_t ** (0.5), alpha_prod_t ** (0.5), direction, alpha_prod_t_prev ** (0.5)


class _MemoisedEulerStep(PerScheduleCache, MemoisedInputScale):
    """What the two Euler steps share with epsilon prediction: per-step factors memoised by
    step index (``_step_factors``, each class's own), the Euler update itself with
    diffusers' tensor operations in its order, and the answer (``_output_class``)."""

    _output_class: Any

    def _fast_step_applies(self, timestep: Any) -> bool:
        # An integer step index as timestep is refused by diffusers' own step, with its
        # error; without scale_model_input it warns: both are left to it.
        return (
            not isinstance(timestep, (int, torch.IntTensor, torch.LongTensor))
            and self.is_scale_input_called
            and self.config.prediction_type == "epsilon"
        )

    def _factors(self, timestep: Any) -> Any:
        if self.step_index is None:
            self._init_step_index(timestep)
        return self._memoised(self.step_index, self._step_factors)

    @staticmethod
    def _euler_update(
        model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, dt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, x + (x - x0) / sigma * dt), before any noise and dtype cast."""
        sample = sample.to(torch.float32)
        pred_original_sample = sample - sigma * model_output
        derivative = (sample - pred_original_sample) / sigma
        return pred_original_sample, sample + derivative * dt

    def _step_output(
        self,
        prev_sample: torch.Tensor,
        pred_original_sample: torch.Tensor,
        dtype: torch.dtype,
        return_dict: bool,
    ) -> Any:
        """Cast, advance the step index and answer in diffusers' shape."""
        prev_sample = prev_sample.to(dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return self._output_class(
            prev_sample=prev_sample, pred_original_sample=pred_original_sample
        )


class CachedEulerDiscreteScheduler(_MemoisedEulerStep, EulerDiscreteScheduler):
    """Euler's step without churn (the pipeline's call: no ``s_*`` arguments) and with
    epsilon prediction: ``sigma_hat`` and ``dt`` depend only on the step index. Memoised;
    any other call runs diffusers' own step."""

    _output_class = EulerDiscreteSchedulerOutput

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        *args: Any,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        if args or kwargs or not self._fast_step_applies(timestep):
            return super().step(
                model_output, timestep, sample, *args, generator=generator,
                return_dict=return_dict, **kwargs,
            )  # fmt: skip
        sigma_hat, dt = self._factors(timestep)
        pred_original_sample, prev_sample = self._euler_update(model_output, sample, sigma_hat, dt)
        return self._step_output(prev_sample, pred_original_sample, model_output.dtype, return_dict)

    def _step_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigmas[self.step_index]
        sigma_hat = sigma * (0.0 + 1)  # gamma is 0.0 without churn
        return sigma_hat, self.sigmas[self.step_index + 1] - sigma_hat


class CachedEulerAncestralDiscreteScheduler(_MemoisedEulerStep, EulerAncestralDiscreteScheduler):
    """Euler ancestral with epsilon prediction: sigma, ``sigma_up`` and ``dt`` (eight 0-d
    tensor ops) depend only on the step index. Memoised; the noise is drawn from the
    caller's generator exactly as diffusers draws it."""

    _output_class = EulerAncestralDiscreteSchedulerOutput

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> Any:
        if not self._fast_step_applies(timestep):
            return super().step(model_output, timestep, sample, generator, return_dict)
        sigma, sigma_up, dt = self._factors(timestep)
        pred_original_sample, prev_sample = self._euler_update(model_output, sample, sigma, dt)
        noise = draw_noise(model_output.shape, model_output.dtype, model_output.device, generator)
        return self._step_output(
            prev_sample + noise * sigma_up, pred_original_sample, model_output.dtype, return_dict
        )

    def _step_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # diffusers' operations, in its order.
        sigma_from = sigma = self.sigmas[self.step_index]
        sigma_to = self.sigmas[self.step_index + 1]
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        return sigma, sigma_up, sigma_down - sigma


class CachedPNDMScheduler(PerScheduleCache, PNDMScheduler):
    """PNDM's update (formula 9 of the paper) with epsilon prediction: its three 0-d
    coefficients depend only on the pair of timesteps. Memoised per pair."""

    def _get_prev_sample(
        self, sample: torch.Tensor, timestep: Any, prev_timestep: Any, model_output: torch.Tensor
    ) -> torch.Tensor:
        if self.config.prediction_type != "epsilon":
            return super()._get_prev_sample(sample, timestep, prev_timestep, model_output)
        sample_coeff, alpha_step, denominator = self._memoised(
            (int(timestep), int(prev_timestep)),
            lambda: self._prev_sample_coefficients(timestep, prev_timestep),
        )
        return sample_coeff * sample - alpha_step * model_output / denominator

    def _prev_sample_coefficients(
        self, timestep: Any, prev_timestep: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # diffusers' operations, in its order.
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = (
            self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        )
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** (0.5)
        denominator = alpha_prod_t * beta_prod_t_prev ** (0.5) + (
            alpha_prod_t * beta_prod_t * alpha_prod_t_prev
        ) ** (0.5)
        return sample_coeff, alpha_prod_t_prev - alpha_prod_t, denominator


class CachedLCMScheduler(PerScheduleCache, LCMScheduler):
    """The latent consistency model's step (LCM-LoRA's) without thresholding or clipping:
    its six 0-d factors (the roots of alpha_prod at this step and the next, the boundary
    condition's c_skip and c_out) depend only on the step index. Memoised; the noise of
    every step but the schedule's last is drawn from the caller's generator exactly as
    diffusers draws it."""

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> Any:
        config = self.config
        if (
            config.thresholding
            or config.clip_sample
            or config.prediction_type not in ("epsilon", "v_prediction")
            or self.num_inference_steps is None
        ):
            return super().step(model_output, timestep, sample, generator, return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        index = self.step_index
        root_alpha, root_beta, c_skip, c_out, root_alpha_prev, root_beta_prev = self._memoised(
            ("lcm", index), lambda: self.step_factors(index, timestep)
        )
        # diffusers' operations, in its order.
        if config.prediction_type == "epsilon":
            pred_original_sample = (sample - root_beta * model_output) / root_alpha
        else:
            pred_original_sample = root_alpha * sample - root_beta * model_output
        denoised = c_out * pred_original_sample + c_skip * sample
        if index != self.num_inference_steps - 1:
            noise = draw_noise(model_output.shape, denoised.dtype, model_output.device, generator)
            prev_sample = root_alpha_prev * denoised + root_beta_prev * noise
        else:
            prev_sample = denoised
        self._step_index += 1
        if not return_dict:
            return (prev_sample, denoised)
        return LCMSchedulerOutput(prev_sample=prev_sample, denoised=denoised)

    def step_factors(self, index: int, timestep: Any) -> tuple[torch.Tensor, ...]:
        """The factors of step ``index`` (at ``timestep``, a 0-d tensor as in diffusers'
        loop: c_skip and c_out are then float32 tensors, as there)."""
        # diffusers' operations, in its order.
        prev_index = index + 1
        prev_timestep = self.timesteps[prev_index] if prev_index < len(self.timesteps) else timestep
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = (
            self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        )
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        c_skip, c_out = self.get_scalings_for_boundary_condition_discrete(timestep)
        return (
            alpha_prod_t.sqrt(),
            beta_prod_t.sqrt(),
            c_skip,
            c_out,
            alpha_prod_t_prev.sqrt(),
            beta_prod_t_prev.sqrt(),
        )


# diffusers' class name -> its memoised subclass: every name in schedulers.SCHEDULERS runs
# one of these (TCD, whose few steps are few Python, its own class).
FAST_SCHEDULERS = {
    "DDIMScheduler": CachedDDIMScheduler,
    "LMSDiscreteScheduler": CachedLMSDiscreteScheduler,
    "PNDMScheduler": CachedPNDMScheduler,
    "EulerDiscreteScheduler": CachedEulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": CachedEulerAncestralDiscreteScheduler,
    "DPMSolverMultistepScheduler": CachedDPMSolverMultistepScheduler,
    "UniPCMultistepScheduler": CachedUniPCMultistepScheduler,
    "LCMScheduler": CachedLCMScheduler,
    "TCDScheduler": TCDScheduler,
}
