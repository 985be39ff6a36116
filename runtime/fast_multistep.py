"""The multistep solvers (DPM-Solver++, UniPC) with their per-step coefficients memoised
per schedule, computed exactly as diffusers computes them (see fast_schedulers.py)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from sdtrt.runtime.scheduler_memo import MemoisedAlphaSigma


class CachedDPMSolverMultistepScheduler(MemoisedAlphaSigma, DPMSolverMultistepScheduler):
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


class CachedUniPCMultistepScheduler(MemoisedAlphaSigma, UniPCMultistepScheduler):
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
