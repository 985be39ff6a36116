"""A schedule as a table: the per-step scalars of diffusers' schedulers, computed on the
host once per request, so that the denoising step itself (runtime/step_graph.py) is a pure
function of device tensors that a CUDA graph can replay.

Eager, each step of the loop runs Python around the UNet: the scheduler's step index, its
coefficient look-ups, its list of past derivatives. A CUDA graph replays kernels only, at
the addresses they were captured with. So a schedule becomes a table (a row of scalars per
step), read on the device by a step index that the step itself advances: one captured
step is right for every step of every schedule of its kind. Each row holds diffusers' own
scalar arithmetic for its scheduler, in diffusers' order: the tabulated loop equals
diffusers' bit for bit (tests/test_step_table.py).

Tabulated, with epsilon or v prediction, as Stable Diffusion configures them: lms, euler
(no churn), ddim (eta 0), dpmpp_2m, pndm (PLMS), unipc (order 2, its corrector and
predictor both in the step), euler_a and lcm (their noise drawn for every step before the
loop, from the caller's generator in diffusers' order). Other settings (thresholding, solver
order 3, Runge-Kutta PNDM...) get None and run the eager loop, where the UNet alone is
replayed as a graph.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import LMSDiscreteScheduler

from sdtrt.runtime.fast_multistep import (
    CachedDPMSolverMultistepScheduler,
    CachedUniPCMultistepScheduler,
)
from sdtrt.runtime.fast_schedulers import (
    CachedDDIMScheduler,
    CachedEulerAncestralDiscreteScheduler,
    CachedEulerDiscreteScheduler,
    CachedLCMScheduler,
    CachedPNDMScheduler,
)
from sdtrt.runtime.steps import draw_noise

PREDICTIONS = ("epsilon", "v_prediction")
LMS_ORDER = 4  # the pipeline calls LMS's step with its default order
UNIPC_HISTORY = 3  # the last two data predictions, then the sample before the last predictor
PNDM_HISTORY = 5  # PLMS' last four model outputs, then the sample its second step restarts from


@dataclass(frozen=True)
class StepKind:
    """What a captured step depends on besides its tensors (a graph per kind)."""

    scheduler: str
    """lms, euler, euler_a, ddim, dpmpp_2m, pndm, unipc or lcm."""
    prediction: str
    columns: tuple[str, ...]
    """The per-step scalars, in the order of the table's columns."""
    history: int
    """Past results the step keeps (LMS: its order's derivatives; DPM++ 2M: the last data
    prediction; PNDM: four model outputs and a sample; UniPC: two data predictions and a
    sample)."""
    noise: bool = False
    """Whether each step adds fresh noise (euler_a; lcm but at the schedule's last step,
    its column ``final``): drawn for all steps before the loop, from the caller's generator
    in diffusers' order, and read by step like the scalars."""


@dataclass(frozen=True)
class StepTable:
    kind: StepKind
    values: torch.Tensor
    """[steps, columns] float32: the per-step scalars, diffusers' values bit for bit."""
    timesteps: torch.Tensor
    """[steps]: the UNet's timestep at each step, in the scheduler's dtype."""
    noise: torch.Tensor | None = None
    """[steps, *latents.shape]: each step's fresh noise, for kinds that add it."""

    def __len__(self) -> int:
        return int(self.values.shape[0])


def tabulate(
    scheduler: Any,
    timesteps: torch.Tensor,
    latents: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> StepTable | None:
    """The table of the steps left (``timesteps``, after ``start_timesteps`` set the
    scheduler's begin index), or None where this scheduler's step is not tabulated. An
    ancestral scheduler's noise is drawn here, like ``latents``, from ``generator``: call
    it where diffusers' loop would start drawing (after the start latents are noised)."""
    prediction = scheduler.config.prediction_type
    if prediction not in PREDICTIONS:
        return None
    begin = getattr(scheduler, "begin_index", None) or 0
    can_draw_noise = latents is not None  # else an ancestral kind is not tabulated

    def rows() -> tuple[StepKind, torch.Tensor] | None:
        return _rows(scheduler, timesteps, prediction, begin, can_draw_noise)

    # sdtrt's memoised schedulers keep values per schedule (scheduler_memo.py): a request
    # with the steps and strength of an earlier one reuses its rows (UniPC's took 13 ms
    # of host work per request on the development CPU).
    memoised = getattr(scheduler, "_memoised", None)
    key = ("step table", begin, len(timesteps), can_draw_noise)
    tabled = memoised(key, rows) if memoised is not None else rows()
    if tabled is None:
        return None
    kind, values = tabled
    noise = None
    if kind.noise and latents is not None:
        # diffusers' draws: one per step (LCM's last step draws none), the model output's
        # shape, dtype and device.
        final = values[:, kind.columns.index("final")] if "final" in kind.columns else None
        shape, dtype, device = latents.shape, latents.dtype, latents.device
        noise = torch.stack(
            [
                torch.zeros(shape, dtype=dtype, device=device)
                if final is not None and final[i] == 1
                else draw_noise(shape, dtype, device, generator)
                for i in range(len(values))
            ]
        )
    values = values.to(timesteps.device, torch.float32)
    return StepTable(kind, values, timesteps.clone(), noise)


def _rows(
    scheduler: Any, timesteps: torch.Tensor, prediction: str, begin: int, can_draw_noise: bool
) -> tuple[StepKind, torch.Tensor] | None:
    """The kind and the [steps, columns] float32 values of the steps left, on the host."""
    steps = range(len(timesteps))
    config: Any = scheduler.config
    if isinstance(scheduler, LMSDiscreteScheduler):
        on_host = _on_host(scheduler)
        rows = [_lms_row(on_host, begin + i, i) for i in steps]
        name, history = "lms", LMS_ORDER
    elif isinstance(scheduler, CachedEulerDiscreteScheduler):
        on_host = _on_host(scheduler)
        rows = [_euler_row(on_host, begin + i) for i in steps]
        name, history = "euler", 0
    elif isinstance(scheduler, CachedDDIMScheduler) and not (
        config.thresholding or config.clip_sample
    ):
        rows = [_ddim_row(scheduler, int(t)) for t in timesteps.cpu()]
        name, history = "ddim", 0
    elif isinstance(scheduler, CachedEulerAncestralDiscreteScheduler) and can_draw_noise:
        on_host = _on_host(scheduler)
        rows = [_euler_ancestral_row(on_host, begin + i) for i in steps]
        name, history = "euler_a", 0
    elif isinstance(scheduler, CachedPNDMScheduler) and config.skip_prk_steps:
        rows = [_pndm_row(scheduler, int(t), i) for i, t in enumerate(timesteps.cpu())]
        name, history = "pndm", PNDM_HISTORY
    elif isinstance(scheduler, CachedUniPCMultistepScheduler) and _is_unipc_2(config):
        rows = _unipc_rows(scheduler, begin, len(timesteps))
        name, history = "unipc", UNIPC_HISTORY
    elif isinstance(scheduler, CachedDPMSolverMultistepScheduler) and _is_dpmpp_2m(config):
        on_host = _on_host(scheduler)
        rows = [_dpmpp_2m_row(on_host, begin + i, i) for i in steps]
        name, history = "dpmpp_2m", 1
    elif (
        isinstance(scheduler, CachedLCMScheduler)
        and can_draw_noise
        and not (config.thresholding or config.clip_sample)
    ):
        on_host = _on_host(scheduler, ("timesteps", "alphas_cumprod"))
        rows = [_lcm_row(on_host, begin + i, t) for i, t in enumerate(timesteps.cpu())]
        name, history = "lcm", 0
    else:
        return None
    if not rows:
        return None
    noisy = name in ("euler_a", "lcm")
    kind = StepKind(name, prediction, tuple(rows[0]), history, noise=noisy)
    return kind, torch.stack([torch.stack([row[c] for c in kind.columns]) for row in rows])


def _on_host(scheduler: Any, schedule: tuple[str, ...] = ("sigmas",)) -> Any:
    """A shallow copy of ``scheduler`` whose ``schedule`` tensors are on the host: its
    methods then compute the per-step scalars without reading a GPU schedule back value by
    value."""
    on_host = copy.copy(scheduler)
    for name in schedule:
        setattr(on_host, name, getattr(scheduler, name).cpu())
    return on_host


def _scalar(value: Any) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32).reshape(())


def _sigma_columns(sigma: torch.Tensor) -> dict[str, torch.Tensor]:
    # diffusers' operations, in its order: the input scale and the v-prediction factors.
    return {
        "sigma": _scalar(sigma),
        "input_divisor": _scalar((sigma**2 + 1) ** 0.5),
        "v_out": _scalar(-sigma / (sigma**2 + 1) ** 0.5),
        "v_skip_divisor": _scalar(sigma**2 + 1),
    }


def _lms_row(on_host: Any, index: int, taken: int) -> dict[str, torch.Tensor]:
    """LMS at step ``index``: diffusers' coefficients (``get_lms_coefficient``, scipy
    quadrature over the host sigmas) for the newest derivative first, zero where diffusers
    has no derivative yet (``taken`` steps ran before this one)."""
    order = min(index + 1, LMS_ORDER)
    row = _sigma_columns(on_host.sigmas[index])
    for k in range(LMS_ORDER):
        weight = 0.0
        if k < order and k <= taken:
            weight = float(on_host.get_lms_coefficient(order, index, k))
        row[f"w{k}"] = _scalar(weight)
    return row


def _euler_row(on_host: Any, index: int) -> dict[str, torch.Tensor]:
    on_host._step_index = index
    sigma_hat, dt = on_host._step_factors()  # the memoised Euler's (diffusers' operations)
    return {
        **_sigma_columns(on_host.sigmas[index]),
        "sigma_hat": _scalar(sigma_hat),
        "dt": _scalar(dt),
    }


def _euler_ancestral_row(on_host: Any, index: int) -> dict[str, torch.Tensor]:
    on_host._step_index = index
    sigma, sigma_up, dt = on_host._step_factors()  # the memoised Euler A's
    return {**_sigma_columns(sigma), "sigma_up": _scalar(sigma_up), "dt": _scalar(dt)}


def _ddim_row(scheduler: Any, t: int) -> dict[str, torch.Tensor]:
    # The memoised DDIM's factors (eta 0): diffusers' operations, proven exact.
    root_beta, root_alpha, direction, root_alpha_prev = scheduler._step_factors(t, 0.0)
    return {
        "input_divisor": _scalar(1.0),
        "root_alpha": _scalar(root_alpha),
        "root_beta": _scalar(root_beta),
        "direction": _scalar(direction),
        "root_alpha_prev": _scalar(root_alpha_prev),
    }


def _lcm_row(on_host: Any, index: int, t: torch.Tensor) -> dict[str, torch.Tensor]:
    # The memoised LCM's factors (diffusers' operations, proven exact), at the 0-d timestep
    # diffusers' loop passes.
    factors = on_host.step_factors(index, t)
    names = ("root_alpha", "root_beta", "c_skip", "c_out", "root_alpha_prev", "root_beta_prev")
    return {
        "input_divisor": _scalar(1.0),  # LCM does not scale the UNet's input
        **{name: _scalar(value) for name, value in zip(names, factors, strict=True)},
        "final": _scalar(index == on_host.num_inference_steps - 1),  # no noise after it
    }


def _pndm_row(scheduler: Any, t: int, counter: int) -> dict[str, torch.Tensor]:
    """PLMS (PNDM without Runge-Kutta steps, Stable Diffusion's) at its ``counter``-th
    step: which of its five combinations of past outputs applies (``case``, diffusers'
    branches in order) and formula (9)'s factors at the timesteps it uses."""
    ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    # The second step re-does the first interval from the first step's sample.
    t, prev_t = (t + ratio, t) if counter == 1 else (t, t - ratio)
    # Formula (9)'s factors from the memoised PNDM (diffusers' operations, proven exact);
    # v prediction's conversion, which _get_prev_sample does first, needs alpha_prod_t's
    # roots too.
    sample_coeff, alpha_step, denominator = scheduler._prev_sample_coefficients(t, prev_t)
    alpha_prod_t = scheduler.alphas_cumprod[t]
    return {
        "input_divisor": _scalar(1.0),  # PNDM does not scale the UNet's input
        "case": _scalar(min(counter, 4)),
        "root_alpha": _scalar(alpha_prod_t**0.5),
        "root_beta": _scalar((1 - alpha_prod_t) ** 0.5),
        "sample_coeff": _scalar(sample_coeff),
        "alpha_step": _scalar(alpha_step),
        "denominator": _scalar(denominator),
    }


def _is_unipc_2(config: Any) -> bool:
    """UniPC as Stable Diffusion runs it: order 2, bh2, data prediction, corrector on."""
    return (
        config.solver_order == 2
        and config.predict_x0
        and config.solver_type in ("bh1", "bh2")
        and not config.thresholding
        and not config.disable_corrector
        and config.solver_p is None
        and not config.use_flow_sigmas
    )


def _unipc_rows(scheduler: Any, begin: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """UniPC's corrector (from the second step run) and predictor at each step, with the
    orders diffusers' step picks; the factors come from sdtrt's memoised UniPC (diffusers'
    own operations, proven exact), on a copy whose sigmas are on the host."""
    on_host = _on_host(scheduler)
    config, total = scheduler.config, len(scheduler.timesteps)
    rows, previous_order = [], 0
    for taken in range(steps):
        index = begin + taken
        on_host._step_index = index
        alpha, sigma = on_host._sigma_to_alpha_sigma_t(on_host.sigmas[index])
        order = min(config.solver_order, total - index) if config.lower_order_final else 2
        order = min(order, min(taken, config.solver_order) + 1)
        row = {"input_divisor": _scalar(1.0), "alpha": _scalar(alpha), "sigma": _scalar(sigma)}
        row |= _uni_columns("c_", on_host, True, previous_order)
        row |= _uni_columns("p_", on_host, False, order)
        rows.append(row)
        previous_order = order
    return rows


def _uni_columns(prefix: str, scheduler: Any, corrector: bool, order: int) -> dict[str, Any]:
    """One UniPC update's factors. A missing second-order term gets a zero weight and a
    unit ratio (its difference is then finite, and weighs exactly nothing); a corrector
    that does not run (``order`` 0: the first step) gets zeros and ``use`` 0."""
    zero, one = _scalar(0.0), _scalar(1.0)
    names: tuple[str, ...] = ("scale", "first", "last", "rho0", "rk")
    if corrector:
        names += ("use", "rho_last")
    if order == 0:
        return {prefix + n: zero if n != "rk" else one for n in names}
    cpu = torch.device("cpu")
    c = scheduler._compute_uni_coefficients(corrector, order, cpu, torch.float32)
    rho0 = zero
    if order == 2:
        rho0 = _scalar(c["rhos"][0])
    values = {
        "use": one,
        "scale": _scalar(c["scale"]),
        "first": _scalar(c["first"]),
        "last": _scalar(c["last"]),
        "rho0": rho0,
        "rho_last": _scalar(c["rho_last"]) if corrector else zero,
        "rk": _scalar(c["rks"][0]) if c["rks"] else one,
    }
    return {prefix + n: values[n] for n in names}


def _is_dpmpp_2m(config: Any) -> bool:
    """DPM-Solver++(2M) as Stable Diffusion runs it: deterministic, second order."""
    return (
        config.algorithm_type == "dpmsolver++"
        and config.solver_type == "midpoint"
        and config.solver_order == 2
        and not config.thresholding
        and not config.use_flow_sigmas
        and config.variance_type is None
    )


def _dpmpp_2m_row(on_host: Any, index: int, taken: int) -> dict[str, torch.Tensor]:
    """DPM-Solver++(2M) at step ``index``: the data prediction's alpha and sigma, then the
    update's factors from the memoised DPM-Solver (diffusers' operations), second order
    except on the first step run and (as diffusers decides it) the last, where the
    factors of the previous prediction are zero."""
    config = on_host.config
    on_host._step_index = index
    alpha, sigma = on_host._sigma_to_alpha_sigma_t(on_host.sigmas[index])
    scale, first = on_host._first_order_coefficients()
    row = {
        "input_divisor": _scalar(1.0),  # DPM-Solver does not scale the UNet's input
        "alpha": _scalar(alpha),
        "sigma": _scalar(sigma),
        "scale": _scalar(scale),
        "first": _scalar(first),
    }
    last = index == len(on_host.timesteps) - 1 and (
        config.euler_at_final
        or (config.lower_order_final and len(on_host.timesteps) < 15)
        or config.final_sigmas_type == "zero"
    )
    if taken == 0 or last:
        return {**row, "second": _scalar(0.0), "inv_r0": _scalar(0.0)}
    _, inv_r0, _, second = on_host._second_order_coefficients()
    return {**row, "second": _scalar(second), "inv_r0": _scalar(inv_r0)}
