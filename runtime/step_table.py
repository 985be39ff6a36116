"""One denoising step as a pure function of device tensors: what a CUDA graph can replay.

Eager, each step of the loop runs Python around the UNet: the scheduler's step index, its
coefficient look-ups, its list of past derivatives. A CUDA graph replays kernels only, at
the addresses they were captured with. So here a schedule becomes a table (a row of
scalars per step), the scheduler's history a fixed tensor, and the step index a device
tensor that the step itself advances: one captured step is right for every step of every
schedule of its kind, and the host does one replay per step (engine/cuda_graphs.py).

Each step function below is diffusers' own arithmetic for its scheduler, in diffusers'
order, with the per-step scalars read from the table row instead of computed: the loop
equals diffusers' on the CPU too (tests/test_step_table.py), where it runs eagerly.

Tabulated, with epsilon or v prediction, as Stable Diffusion configures them: lms, euler
(no churn), ddim (eta 0), dpmpp_2m, pndm (PLMS), unipc (order 2, its corrector and
predictor both in the step) and euler_a (its noise drawn for every step before the loop,
from the caller's generator in diffusers' order). Other settings (thresholding, solver
order 3, Runge-Kutta PNDM...) get None and run the eager loop, where the UNet alone is
replayed as a graph.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from sdtrt.engine.cuda_graphs import capture
from sdtrt.runtime.fast_schedulers import CachedUniPCMultistepScheduler

Unet = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
PREDICTIONS = ("epsilon", "v_prediction")
LMS_ORDER = 4  # the pipeline calls LMS's step with its default order
UNIPC_HISTORY = 3  # the last two data predictions, then the sample before the last predictor
PNDM_HISTORY = 5  # PLMS' last four model outputs, then the sample its second step restarts from


@dataclass(frozen=True)
class StepKind:
    """What a captured step depends on besides its tensors (a graph per kind)."""

    scheduler: str
    """lms, euler, euler_a, ddim, dpmpp_2m, pndm or unipc."""
    prediction: str
    columns: tuple[str, ...]
    """The per-step scalars, in the order of the table's columns."""
    history: int
    """Past results the step keeps (LMS: its order's derivatives; DPM++ 2M: the last data
    prediction; PNDM: four model outputs and a sample; UniPC: two data predictions and a
    sample)."""
    noise: bool = False
    """Whether each step adds fresh noise (euler_a): drawn for all steps before the loop,
    from the caller's generator in diffusers' order, and read by step like the scalars."""


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
    generator: torch.Generator | None = None,
) -> StepTable | None:
    """The table of the steps left (``timesteps``, after ``start_timesteps`` set the
    scheduler's begin index), or None where this scheduler's step is not tabulated. An
    ancestral scheduler's noise is drawn here, like ``latents``, from ``generator``: call
    it where diffusers' loop would start drawing (after the start latents are noised)."""
    prediction = scheduler.config.prediction_type
    if prediction not in PREDICTIONS:
        return None
    begin = getattr(scheduler, "begin_index", None) or 0
    steps = range(len(timesteps))
    config: Any = scheduler.config
    if isinstance(scheduler, LMSDiscreteScheduler):
        sigmas = _host_sigmas(scheduler)
        rows = [_lms_row(scheduler, sigmas, begin + i, i) for i in steps]
        name, history = "lms", LMS_ORDER
    elif isinstance(scheduler, EulerDiscreteScheduler):
        sigmas = _host_sigmas(scheduler)
        rows = [_euler_row(sigmas, begin + i) for i in steps]
        name, history = "euler", 1
    elif isinstance(scheduler, DDIMScheduler) and not (config.thresholding or config.clip_sample):
        rows = [_ddim_row(scheduler, int(t)) for t in timesteps.cpu()]
        name, history = "ddim", 1
    elif isinstance(scheduler, EulerAncestralDiscreteScheduler) and latents is not None:
        sigmas = _host_sigmas(scheduler)
        rows = [_euler_ancestral_row(sigmas, begin + i) for i in steps]
        name, history = "euler_a", 0
    elif isinstance(scheduler, PNDMScheduler) and config.skip_prk_steps:
        rows = [_pndm_row(scheduler, int(t), i) for i, t in enumerate(timesteps.cpu())]
        name, history = "pndm", PNDM_HISTORY
    elif isinstance(scheduler, CachedUniPCMultistepScheduler) and _is_unipc_2(config):
        rows = _unipc_rows(scheduler, begin, len(timesteps))
        name, history = "unipc", UNIPC_HISTORY
    elif isinstance(scheduler, DPMSolverMultistepScheduler) and _is_dpmpp_2m(config):
        sigmas = _host_sigmas(scheduler)
        rows = [_dpmpp_2m_row(scheduler, sigmas, begin + i, i) for i in steps]
        name, history = "dpmpp_2m", 1
    else:
        return None
    if not rows:
        return None
    kind = StepKind(name, prediction, tuple(rows[0]), history, noise=name == "euler_a")
    values = torch.stack([torch.stack([row[c] for c in kind.columns]) for row in rows])
    noise = None
    if kind.noise and latents is not None:
        # diffusers' draws: one per step, the model output's shape, dtype and device.
        noise = torch.stack(
            [
                randn_tensor(
                    latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
                )
                for _ in rows
            ]
        )
    values = values.to(timesteps.device, torch.float32)
    return StepTable(kind, values, timesteps.clone(), noise)


def _host_sigmas(scheduler: Any) -> torch.Tensor:
    return scheduler.sigmas.cpu()


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


def _lms_row(
    scheduler: Any, sigmas: torch.Tensor, index: int, taken: int
) -> dict[str, torch.Tensor]:
    """LMS at step ``index``: its coefficients for the newest derivative first, zero where
    diffusers has no derivative yet (``taken`` steps ran before this one)."""
    order = min(index + 1, LMS_ORDER)
    row = _sigma_columns(sigmas[index])
    for k in range(LMS_ORDER):
        weight = 0.0
        if k < order and k <= taken:
            weight = _lms_coefficient(scheduler, sigmas, order, index, k)
        row[f"w{k}"] = _scalar(weight)
    return row


def _lms_coefficient(scheduler: Any, sigmas: torch.Tensor, order: int, t: int, k: int) -> float:
    """diffusers' ``get_lms_coefficient`` (scipy quadrature over the sigmas), on a copy of
    the scheduler whose sigmas are on the host: on a GPU schedule it would read them back
    one by one."""
    on_host = copy.copy(scheduler)
    on_host.sigmas = sigmas
    return float(on_host.get_lms_coefficient(order, t, k))


def _euler_row(sigmas: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
    sigma = sigmas[index]
    sigma_hat = sigma * (0.0 + 1)  # gamma is 0.0 without churn, as the pipeline calls it
    return {
        **_sigma_columns(sigma),
        "sigma_hat": _scalar(sigma_hat),
        "dt": _scalar(sigmas[index + 1] - sigma_hat),
    }


def _euler_ancestral_row(sigmas: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
    # diffusers' operations, in its order.
    sigma_from = sigma = sigmas[index]
    sigma_to = sigmas[index + 1]
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return {
        **_sigma_columns(sigma),
        "sigma_up": _scalar(sigma_up),
        "dt": _scalar(sigma_down - sigma),
    }


def _ddim_row(scheduler: Any, t: int) -> dict[str, torch.Tensor]:
    # diffusers' operations (eta 0), in its order.
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prod_t = scheduler.alphas_cumprod[t]
    alpha_prod_t_prev = (
        scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    )
    beta_prod_t = 1 - alpha_prod_t
    return {
        "input_divisor": _scalar(1.0),
        "root_alpha": _scalar(alpha_prod_t ** (0.5)),
        "root_beta": _scalar(beta_prod_t ** (0.5)),
        "direction": _scalar((1 - alpha_prod_t_prev) ** (0.5)),  # eta 0: no variance term
        "root_alpha_prev": _scalar(alpha_prod_t_prev ** (0.5)),
    }


def _pndm_row(scheduler: Any, t: int, counter: int) -> dict[str, torch.Tensor]:
    """PLMS (PNDM without Runge-Kutta steps, Stable Diffusion's) at its ``counter``-th
    step: which of its five combinations of past outputs applies (``case``, diffusers'
    branches in order) and formula (9)'s factors at the timesteps it uses."""
    ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    # The second step re-does the first interval from the first step's sample.
    t, prev_t = (t + ratio, t) if counter == 1 else (t, t - ratio)
    # diffusers' operations (_get_prev_sample), in its order.
    alpha_prod_t = scheduler.alphas_cumprod[t]
    alpha_prod_t_prev = (
        scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    )
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    return {
        "input_divisor": _scalar(1.0),  # PNDM does not scale the UNet's input
        "case": _scalar(min(counter, 4)),
        "root_alpha": _scalar(alpha_prod_t**0.5),
        "root_beta": _scalar(beta_prod_t**0.5),
        "sample_coeff": _scalar((alpha_prod_t_prev / alpha_prod_t) ** (0.5)),
        "alpha_step": _scalar(alpha_prod_t_prev - alpha_prod_t),
        "denominator": _scalar(
            alpha_prod_t * beta_prod_t_prev ** (0.5)
            + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** (0.5)
        ),
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
    on_host = copy.copy(scheduler)
    on_host.sigmas = _host_sigmas(scheduler)
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


def _dpmpp_2m_row(
    scheduler: Any, sigmas: torch.Tensor, index: int, taken: int
) -> dict[str, torch.Tensor]:
    """DPM-Solver++(2M) at step ``index``: the data prediction's alpha and sigma, then the
    update's factors, second order except on the first step run and (as diffusers decides
    it) the last, where the factors of the previous prediction are zero."""
    config = scheduler.config
    alpha, sigma = scheduler._sigma_to_alpha_sigma_t(sigmas[index])
    # diffusers' operations, in its order (dpm_solver_first_order_update and
    # multistep_dpm_solver_second_order_update).
    alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(sigmas[index + 1])
    alpha_s0, sigma_s0 = scheduler._sigma_to_alpha_sigma_t(sigmas[index])
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    h = lambda_t - lambda_s0
    first = alpha_t * (torch.exp(-h) - 1.0)
    row = {
        "input_divisor": _scalar(1.0),  # DPM-Solver does not scale the UNet's input
        "alpha": _scalar(alpha),
        "sigma": _scalar(sigma),
        "scale": _scalar(sigma_t / sigma_s0),
    }
    last = index == len(scheduler.timesteps) - 1 and (
        config.euler_at_final
        or (config.lower_order_final and len(scheduler.timesteps) < 15)
        or config.final_sigmas_type == "zero"
    )
    if taken == 0 or last:
        return {**row, "first": _scalar(first), "second": _scalar(0.0), "inv_r0": _scalar(0.0)}
    alpha_s1, sigma_s1 = scheduler._sigma_to_alpha_sigma_t(sigmas[index - 1])
    lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
    r0 = (lambda_s0 - lambda_s1) / h
    return {
        **row,
        "first": _scalar(first),
        "second": _scalar(0.5 * first),
        "inv_r0": _scalar(1.0 / r0),
    }


@dataclass
class StepState:
    """Everything a captured step reads and writes, in fixed device tensors: ``load`` puts
    a request's values in place before the first replay."""

    table: torch.Tensor
    """[rows, columns]: a schedule's table in its first rows (any schedule of its kind)."""
    timesteps: torch.Tensor
    latents: torch.Tensor
    history: torch.Tensor
    """[history, *latents.shape]: past results, newest first; zero where none yet."""
    text_embeddings: torch.Tensor
    guidance: torch.Tensor
    """0-d: the guidance scale, so that one graph serves every scale."""
    index: torch.Tensor
    """[1] int64: the row of the step to run next; each step adds one."""
    noise: torch.Tensor
    """[rows, *latents.shape]: each step's fresh noise (no rows for kinds without)."""

    @classmethod
    def like(
        cls, table: StepTable, latents: torch.Tensor, text_embeddings: torch.Tensor, rows: int
    ) -> StepState:
        device = latents.device
        return cls(
            table=torch.zeros(rows, table.values.shape[1], device=device),
            timesteps=torch.zeros(rows, dtype=table.timesteps.dtype, device=device),
            latents=torch.zeros_like(latents),
            history=torch.zeros(table.kind.history, *latents.shape, device=device),
            text_embeddings=torch.zeros_like(text_embeddings),
            guidance=torch.zeros((), device=device),
            index=torch.zeros(1, dtype=torch.int64, device=device),
            noise=torch.zeros(rows if table.kind.noise else 0, *latents.shape, device=device),
        )

    def load(
        self,
        table: StepTable,
        latents: torch.Tensor,
        text_embeddings: torch.Tensor,
        guidance_scale: float,
    ) -> None:
        self.table[: len(table)].copy_(table.values)
        self.timesteps[: len(table)].copy_(table.timesteps)
        self.latents.copy_(latents)
        self.history.zero_()
        self.text_embeddings.copy_(text_embeddings)
        self.guidance.fill_(guidance_scale)
        self.index.zero_()
        if table.noise is not None:
            self.noise[: len(table)].copy_(table.noise)


def table_step(kind: StepKind, state: StepState, unet: Unet, do_guidance: bool) -> None:
    """One denoising step, in place on ``state``: the UNet on [uncond, cond] rows, guidance,
    the scheduler's update. No Python value depends on the step: capturable once."""
    row = state.table.index_select(0, state.index)  # [1, columns]
    c = {name: row[:, k] for k, name in enumerate(kind.columns)}  # each [1]
    if kind.noise:
        c["noise"] = state.noise.index_select(0, state.index)[0]
    latents = state.latents
    model_input = torch.cat([latents] * 2) if do_guidance else latents
    model_input = model_input / c["input_divisor"]
    timestep = state.timesteps.index_select(0, state.index)
    noise_pred = unet(model_input, timestep, state.text_embeddings)
    if do_guidance:
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + state.guidance * (noise_pred_text - noise_pred_uncond)
    state.latents.copy_(_UPDATES[kind.scheduler](kind, c, latents, noise_pred, state.history))
    state.index.add_(1)


def _x0_from_sigma(
    kind: StepKind,
    c: dict[str, torch.Tensor],
    sigma: torch.Tensor,
    x: torch.Tensor,
    m: torch.Tensor,
) -> torch.Tensor:
    """LMS' and Euler's predicted original sample, as diffusers computes it."""
    if kind.prediction == "epsilon":
        return x - sigma * m
    return m * c["v_out"] + (x / c["v_skip_divisor"])


def _lms_update(
    kind: StepKind, c: dict[str, torch.Tensor], x: torch.Tensor, m: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    derivative = (x - _x0_from_sigma(kind, c, c["sigma"], x, m)) / c["sigma"]
    h.copy_(torch.cat([derivative[None], h[:-1]]))
    # diffusers sums coefficient x derivative, newest first; a missing derivative has a zero
    # coefficient and a zero slot here, which adds exactly nothing.
    total = c["w0"] * h[0]
    for k in range(1, kind.history):
        total = total + c[f"w{k}"] * h[k]
    return x + total


def _euler_update(
    kind: StepKind, c: dict[str, torch.Tensor], x: torch.Tensor, m: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    x0 = _x0_from_sigma(kind, c, c["sigma_hat"], x, m)
    derivative = (x - x0) / c["sigma_hat"]
    return x + derivative * c["dt"]


def _euler_ancestral_update(
    kind: StepKind, c: dict[str, torch.Tensor], x: torch.Tensor, m: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    derivative = (x - _x0_from_sigma(kind, c, c["sigma"], x, m)) / c["sigma"]
    return (x + derivative * c["dt"]) + c["noise"] * c["sigma_up"]


def _ddim_update(
    kind: StepKind, c: dict[str, torch.Tensor], x: torch.Tensor, m: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    root_alpha, root_beta = c["root_alpha"], c["root_beta"]
    if kind.prediction == "epsilon":
        x0 = (x - root_beta * m) / root_alpha
        epsilon = m
    else:
        x0 = root_alpha * x - root_beta * m
        epsilon = root_alpha * m + root_beta * x
    return c["root_alpha_prev"] * x0 + c["direction"] * epsilon


def _dpmpp_2m_update(
    kind: StepKind, c: dict[str, torch.Tensor], x: torch.Tensor, m: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    if kind.prediction == "epsilon":
        x0 = (x - c["sigma"] * m) / c["alpha"]
    else:
        x0 = c["alpha"] * x - c["sigma"] * m
    # A first-order step has zero "second" and "inv_r0": the last term subtracts exactly 0.
    d1 = c["inv_r0"] * (x0 - h[0])
    h.copy_(x0[None])
    return c["scale"] * x - c["first"] * x0 - c["second"] * d1


def _pndm_update(
    kind: StepKind, c: dict[str, torch.Tensor], x: torch.Tensor, m: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    """diffusers' ``step_plms``: its branches are the ``case`` of the row, each computed
    and the right one selected (``torch.where`` is exact), so that no Python ``if``
    depends on the step."""
    case = c["case"].reshape(-1, *([1] * x.ndim))  # broadcast over [history, *latents]
    first, second = case[0] == 0, case[0] == 1
    ets = torch.where(case == 1, h[:4], torch.cat([m[None], h[:3]]))  # no append at step 2
    e1, e2, e3, e4 = ets
    combined = torch.where(
        first,
        m,
        torch.where(
            second,
            (m + e1) / 2,
            torch.where(
                case[0] == 2,
                (3 * e1 - e2) / 2,
                torch.where(
                    case[0] == 3,
                    (23 * e1 - 16 * e2 + 5 * e3) / 12,
                    (1 / 24) * (55 * e1 - 59 * e2 + 37 * e3 - 9 * e4),
                ),
            ),
        ),
    )
    sample = torch.where(second, h[4], x)
    h.copy_(torch.cat([ets, torch.where(first, x, h[4])[None]]))
    if kind.prediction == "v_prediction":
        combined = c["root_alpha"] * combined + c["root_beta"] * sample
    return c["sample_coeff"] * sample - c["alpha_step"] * combined / c["denominator"]


def _unipc_update(
    kind: StepKind, c: dict[str, torch.Tensor], x: torch.Tensor, m: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    """diffusers' UniPC step (``multistep_uni_c_bh_update`` then ``multistep_uni_p_bh_update``,
    as sdtrt's memoised UniPC computes them): the corrector always computed, its result
    used where the row says (``torch.where`` is exact)."""
    if kind.prediction == "epsilon":
        x0 = (x - c["sigma"] * m) / c["alpha"]
    else:
        x0 = c["alpha"] * x - c["sigma"] * m
    m0, m1, last_sample = h[0], h[1], h[2]
    d1 = (m1 - m0) / c["c_rk"]
    corrected = (c["c_scale"] * last_sample - c["c_first"] * m0) - c["c_last"] * (
        c["c_rho0"] * d1 + c["c_rho_last"] * (x0 - m0)
    )
    sample = torch.where(c["c_use"].reshape(-1, *([1] * (x.ndim - 1))) == 1, corrected, x)
    d1 = (m0 - x0) / c["p_rk"]
    predicted = (c["p_scale"] * sample - c["p_first"] * x0) - c["p_last"] * (c["p_rho0"] * d1)
    h.copy_(torch.stack([x0, m0, sample]))  # last: m0 and last_sample are views of h
    return predicted


_UPDATES = {
    "lms": _lms_update,
    "euler": _euler_update,
    "euler_a": _euler_ancestral_update,
    "ddim": _ddim_update,
    "dpmpp_2m": _dpmpp_2m_update,
    "pndm": _pndm_update,
    "unipc": _unipc_update,
}


def run_table(
    table: StepTable,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    guidance_scale: float,
    unet: Unet,
) -> torch.Tensor:
    """The tabulated loop, eager (any device): what one replay per step runs, step by step."""
    do_guidance = text_embeddings.shape[0] == 2 * latents.shape[0]
    state = StepState.like(table, latents, text_embeddings, len(table))
    state.load(table, latents, text_embeddings, guidance_scale)
    for _ in range(len(table)):
        table_step(table.kind, state, unet, do_guidance)
    return state.latents


class StepGraphs:
    """Whole denoising steps replayed as CUDA graphs: one capture per step kind and shapes
    (any schedule, start step and guidance scale of that kind reuse it), then one replay
    per step; on a CPU the same steps run eagerly."""

    rows = 1000  # table rows a captured step can index: a schedule of up to 1000 steps

    def __init__(self, unet: Unet) -> None:
        self.unet = unet
        self.captured: dict[tuple[Any, ...], tuple[Any, StepState]] = {}

    @torch.inference_mode()
    def run(
        self,
        table: StepTable,
        latents: torch.Tensor,
        text_embeddings: torch.Tensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        if latents.device.type != "cuda":
            return run_table(table, latents, text_embeddings, guidance_scale, self.unet)
        do_guidance = text_embeddings.shape[0] == 2 * latents.shape[0]
        key = (table.kind, table.timesteps.dtype, latents.shape, text_embeddings.shape)
        entry = self.captured.get(key)
        if entry is None or len(table) > entry[1].table.shape[0]:
            # Noise rows cost a latent each: an ancestral kind's are sized to its schedule.
            rows = len(table) if table.kind.noise else max(self.rows, len(table))
            state = StepState.like(table, latents, text_embeddings, rows)
            # The warm run before capture steps real values (then reloaded below).
            state.load(table, latents, text_embeddings, guidance_scale)
            graph, _ = capture(lambda: table_step(table.kind, state, self.unet, do_guidance))
            entry = self.captured[key] = (graph, state)
        graph, state = entry
        state.load(table, latents, text_embeddings, guidance_scale)
        for _ in range(len(table)):
            graph.replay()
        return state.latents.clone()
