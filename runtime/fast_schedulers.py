"""diffusers schedulers with their per-step scalar work memoised per schedule.

The loop overhead that is left after the UNet is mostly scheduler arithmetic on scalars
that depend only on the sigma schedule. Each class here computes those values exactly as
its diffusers parent does, once, and reuses the very same floats and tensors afterwards:
results stay bit-identical to diffusers (the exactness tests hold them to it).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
    EulerAncestralDiscreteSchedulerOutput,
)
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput

from sdtrt.runtime.steps import draw_noise

if TYPE_CHECKING:
    # The mixins below are used on top of diffusers' scheduler classes and use their
    # attributes (sigmas, step_index, config...), which diffusers sets dynamically; to the
    # type checker they are typed as diffusers' own: Any.
    _Scheduler = Any
else:
    _Scheduler = object


@functools.lru_cache(maxsize=64)
def _shared_memo(key: tuple[Any, ...]) -> dict[Any, Any]:
    """The memo of one class, config and schedule, shared by every scheduler with them (the
    64 most recently used): the server makes a scheduler per request, and each would
    otherwise start cold (LMS integrates its coefficients with scipy again: about 3 ms a
    step on a 2-core CPU)."""
    return {}


class _PerScheduleCache(_Scheduler):
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
        self._cache = _shared_memo(key)

    def _memoised(self, key: Any, compute: Any) -> Any:
        value = self._cache.get(key)
        if value is None:
            value = self._cache[key] = compute()
        return value


class _MemoisedInputScale(_Scheduler):
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


class CachedLMSDiscreteScheduler(_PerScheduleCache, _MemoisedInputScale, LMSDiscreteScheduler):
    """``LMSDiscreteScheduler.step`` integrates each coefficient with
    ``scipy.integrate.quad`` on every call (about 3 ms a step on a 2-core CPU, as much as a
    tiny UNet call); the coefficients depend only on the sigmas, the step index and the
    order, so they are memoised per schedule."""

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        compute = super().get_lms_coefficient
        return self._memoised((order, t, current_order), lambda: compute(order, t, current_order))


class _MemoisedAlphaSigma(_PerScheduleCache):
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


class CachedDPMSolverMultistepScheduler(_MemoisedAlphaSigma, DPMSolverMultistepScheduler):
    """DPM-Solver++(2M)'s second-order update: its 0-d coefficients (lambdas, h, r0 and the
    products that scale sample, D0 and D1) depend only on the schedule and the step index.
    Memoised per schedule for the midpoint dpmsolver++ solver (DPM++ 2M); every other
    variant runs diffusers' own code."""

    def multistep_dpm_solver_second_order_update(
        self,
        model_output_list: list[torch.Tensor],
        *args: Any,
        sample: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        config = self.config
        if (
            args
            or kwargs
            or sample is None
            or config.algorithm_type != "dpmsolver++"
            or config.solver_type != "midpoint"
        ):
            return super().multistep_dpm_solver_second_order_update(
                model_output_list, *args, sample=sample, noise=noise, **kwargs
            )
        scale, inv_r0, first, second = self._memoised(
            self.step_index, self._second_order_coefficients
        )
        m0, m1 = model_output_list[-1], model_output_list[-2]
        d0, d1 = m0, inv_r0 * (m0 - m1)
        return scale * sample - first * d0 - second * d1

    def _second_order_coefficients(self) -> tuple[torch.Tensor, ...]:
        scale, first, h, lambda_s0 = self._first_order_terms()
        lambda_s1 = self._alpha_sigma_lambda(self.step_index - 1)[2]
        r0 = (lambda_s0 - lambda_s1) / h
        return scale, 1.0 / r0, first, 0.5 * first

    def _first_order_coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``dpm_solver_first_order_update``'s factors (dpmsolver++): x_t = scale * x -
        first * x0. Not used by ``step`` (diffusers' own runs); the step tables read it."""
        scale, first, _, _ = self._first_order_terms()
        return scale, first

    def _first_order_terms(self) -> tuple[torch.Tensor, ...]:
        """From step ``s`` to ``t``: scale, first, h and lambda_s, with diffusers' operations
        in its order (the second-order update shares them)."""
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.step_index + 1)
        _, sigma_s, lambda_s = self._alpha_sigma_lambda(self.step_index)
        h = lambda_t - lambda_s
        return sigma_t / sigma_s, alpha_t * (torch.exp(-h) - 1.0), h, lambda_s

    def _alpha_sigma_lambda(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index])
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)


class CachedUniPCMultistepScheduler(_MemoisedAlphaSigma, UniPCMultistepScheduler):
    """UniPC's predictor and corrector each compute, every step, a dozen 0-d tensors (log
    alphas and sigmas, h, the ratios r_k, B(h), a small linear solve for the rho weights)
    that depend only on the schedule, the step index and the order. They are computed here
    with diffusers' own operations, in its order, once per schedule; the tensor update then
    applies them exactly as diffusers' ``multistep_uni_{p,c}_bh_update`` does (0.42). The
    data prediction (x0 from epsilon) takes its alpha and sigma from the same memo."""

    def _uni_coefficients(
        self, corrector: bool, order: int, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        key = (corrector, self.step_index, order, device, dtype)
        return self._memoised(
            key, lambda: self._compute_uni_coefficients(corrector, order, device, dtype)
        )

    def _compute_uni_coefficients(
        self, corrector: bool, order: int, device: torch.device, dtype: torch.dtype
    ) -> dict[str, Any]:
        # Predictor: from s0 = step_index to t = step_index + 1; corrector: one step back.
        t_index = self.step_index if corrector else self.step_index + 1
        s0_index = t_index - 1
        sigma_t, sigma_s0 = self.sigmas[t_index].to(device), self.sigmas[s0_index].to(device)
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(sigma_t)
        alpha_s0, sigma_s0 = self._sigma_to_alpha_sigma_t(sigma_s0)
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        rks = []
        for i in range(1, order):
            si = s0_index - i
            alpha_si, sigma_si = self._sigma_to_alpha_sigma_t(self.sigmas[si].to(device))
            lambda_si = torch.log(alpha_si) - torch.log(sigma_si)
            rks.append((lambda_si - lambda_s0) / h)
        ratios = list(rks)
        rks.append(torch.ones((), device=device))
        rks_t = torch.stack(rks)
        R, b = [], []
        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial_i = 1
        if self.config.solver_type == "bh1":
            B_h = hh
        elif self.config.solver_type == "bh2":
            B_h = torch.expm1(hh)
        else:
            raise NotImplementedError()
        for i in range(1, order + 1):
            R.append(torch.pow(rks_t, i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        R_t = torch.stack(R)
        b_t = torch.stack(b) if len(b) > 0 else torch.tensor(b, device=device)
        rhos = None
        if corrector:
            if order == 1:
                rhos = torch.ones(1, dtype=dtype, device=device) * 0.5
            else:
                rhos = torch.linalg.solve(R_t, b_t).to(device).to(dtype)
        elif ratios:
            if order == 2:
                rhos = torch.ones(1, dtype=dtype, device=device) * 0.5
            else:
                rhos = torch.linalg.solve(R_t[:-1, :-1], b_t[:-1]).to(device).to(dtype)
        if self.predict_x0:
            scale, first, last = sigma_t / sigma_s0, alpha_t * h_phi_1, alpha_t * B_h
        else:
            scale, first, last = alpha_t / alpha_s0, sigma_t * h_phi_1, sigma_t * B_h
        rho_last = None if rhos is None else rhos[-1]
        return {
            "rks": ratios,
            "rhos": rhos,
            "rho_last": rho_last,
            "scale": scale,
            "first": first,
            "last": last,
        }

    def convert_model_output(
        self,
        model_output: torch.Tensor,
        *args: Any,
        sample: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        config = self.config
        if (
            args
            or kwargs
            or sample is None
            or not self.predict_x0
            or config.prediction_type != "epsilon"
            or config.thresholding
        ):
            return super().convert_model_output(model_output, *args, sample=sample, **kwargs)
        index = self.step_index
        alpha_t, sigma_t = self._memoised(
            ("alpha_sigma", index), lambda: self._sigma_to_alpha_sigma_t(self.sigmas[index])
        )
        return (sample - sigma_t * model_output) / alpha_t

    def multistep_uni_p_bh_update(
        self,
        model_output: torch.Tensor,
        *args: Any,
        sample: torch.Tensor | None = None,
        order: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if args or kwargs or self.solver_p or sample is None or order is None:
            return super().multistep_uni_p_bh_update(
                model_output, *args, sample=sample, order=order, **kwargs
            )
        m0 = self.model_outputs[-1]
        x = sample
        c = self._uni_coefficients(False, order, sample.device, x.dtype)
        d1s = [(self.model_outputs[-(i + 1)] - m0) / rk for i, rk in enumerate(c["rks"], 1)]
        x_t_ = c["scale"] * x - c["first"] * m0
        pred_res = _weighted_sum(c["rhos"], d1s) if d1s else 0
        x_t = x_t_ - c["last"] * pred_res
        return x_t if x_t.dtype == x.dtype else x_t.to(x.dtype)

    def multistep_uni_c_bh_update(
        self,
        this_model_output: torch.Tensor,
        *args: Any,
        last_sample: torch.Tensor | None = None,
        this_sample: torch.Tensor | None = None,
        order: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if args or kwargs or last_sample is None or this_sample is None or order is None:
            return super().multistep_uni_c_bh_update(
                this_model_output,
                *args,
                last_sample=last_sample,
                this_sample=this_sample,
                order=order,
                **kwargs,
            )
        m0 = self.model_outputs[-1]
        x = last_sample
        c = self._uni_coefficients(True, order, this_sample.device, x.dtype)
        d1s = [(self.model_outputs[-(i + 1)] - m0) / rk for i, rk in enumerate(c["rks"], 1)]
        x_t_ = c["scale"] * x - c["first"] * m0
        corr_res = _weighted_sum(c["rhos"][:-1], d1s) if d1s else 0
        d1_t = this_model_output - m0
        x_t = x_t_ - c["last"] * (corr_res + c["rho_last"] * d1_t)
        return x_t if x_t.dtype == x.dtype else x_t.to(x.dtype)


def _weighted_sum(weights: torch.Tensor, terms: list[torch.Tensor]) -> torch.Tensor:
    """diffusers' ``einsum("k,bkc...->bc...", weights, stack(terms, dim=1))``. With one term
    (UniPC of order 2, Stable Diffusion's) that is one product, which a multiply gives with
    the same rounding and without einsum's and stack's Python cost."""
    if len(terms) == 1:
        return weights[0] * terms[0]
    return torch.einsum("k,bkc...->bc...", weights, torch.stack(terms, dim=1))


class CachedDDIMScheduler(_PerScheduleCache, DDIMScheduler):
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


class _MemoisedEulerStep(_PerScheduleCache, _MemoisedInputScale):
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


class CachedPNDMScheduler(_PerScheduleCache, PNDMScheduler):
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


class CachedLCMScheduler(_PerScheduleCache, LCMScheduler):
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
