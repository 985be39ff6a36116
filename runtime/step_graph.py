"""The denoising step as a pure function of device tensors, and its CUDA graphs.

``table_step`` reads its step's row of a schedule's table (runtime/step_table.py) with a
device index, runs the UNet on [uncond, cond] rows, applies guidance with the scale as a
device scalar and the scheduler's update on a fixed history tensor, and advances the
index: no Python value depends on the step, so one capture serves every step, and
``StepGraphs`` replays it once per step. Each update below is diffusers' own arithmetic
for its scheduler, in diffusers' order (branches computed and selected with
``torch.where``, which is exact): the loop equals diffusers' on the CPU too, where it runs
eagerly (tests/test_step_table.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sdtrt.engine.cuda_graphs import Captures, MemoryPool, capture
from sdtrt.runtime.step_table import StepKind, StepTable

Unet = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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

    def carry_on(self, before: StepState) -> None:
        """Go on from ``before``'s step (loaded with the same table): what the steps change,
        its latents, solver history and step index."""
        self.latents.copy_(before.latents)
        self.history.copy_(before.history)
        self.index.copy_(before.index)


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


def _x0_from_alpha_sigma(
    kind: StepKind, alpha: torch.Tensor, sigma: torch.Tensor, x: torch.Tensor, m: torch.Tensor
) -> torch.Tensor:
    """DDIM's, DPM-Solver's and UniPC's predicted original sample, as diffusers computes it
    (DDIM's alpha and sigma are its roots of alpha_prod_t and beta_prod_t)."""
    if kind.prediction == "epsilon":
        return (x - sigma * m) / alpha
    return alpha * x - sigma * m


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
    x0 = _x0_from_alpha_sigma(kind, root_alpha, root_beta, x, m)
    epsilon = m if kind.prediction == "epsilon" else root_alpha * m + root_beta * x
    return c["root_alpha_prev"] * x0 + c["direction"] * epsilon


def _dpmpp_2m_update(
    kind: StepKind, c: dict[str, torch.Tensor], x: torch.Tensor, m: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    x0 = _x0_from_alpha_sigma(kind, c["alpha"], c["sigma"], x, m)
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
    x0 = _x0_from_alpha_sigma(kind, c["alpha"], c["sigma"], x, m)
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


def _lcm_update(
    kind: StepKind, c: dict[str, torch.Tensor], x: torch.Tensor, m: torch.Tensor, h: torch.Tensor
) -> torch.Tensor:
    """diffusers' LCM step: the boundary condition's denoised sample, noised to the next
    timestep but at the schedule's last step (both computed, ``torch.where`` selects)."""
    x0 = _x0_from_alpha_sigma(kind, c["root_alpha"], c["root_beta"], x, m)
    denoised = c["c_out"] * x0 + c["c_skip"] * x
    noised = c["root_alpha_prev"] * denoised + c["root_beta_prev"] * c["noise"]
    return torch.where(c["final"] == 1, denoised, noised)


_UPDATES = {
    "lms": _lms_update,
    "euler": _euler_update,
    "euler_a": _euler_ancestral_update,
    "ddim": _ddim_update,
    "dpmpp_2m": _dpmpp_2m_update,
    "pndm": _pndm_update,
    "unipc": _unipc_update,
    "lcm": _lcm_update,
}


def run_table(
    table: StepTable,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    guidance_scale: float,
    unet: Unet,
    guided: int | None = None,
) -> torch.Tensor:
    """The tabulated loop, eager (any device): what one replay per step runs, step by step
    (``guided``: as ``StepGraphs.run``)."""
    state = StepState.like(table, latents, text_embeddings, len(table))
    state.load(table, latents, text_embeddings, guidance_scale)
    for texts, steps in phases(len(table), latents, text_embeddings, guided):
        state.text_embeddings = texts
        do_guidance = texts.shape[0] == 2 * latents.shape[0]
        for _ in range(steps):
            table_step(table.kind, state, unet, do_guidance)
    return state.latents


def phases(
    steps: int, latents: torch.Tensor, text_embeddings: torch.Tensor, guided: int | None
) -> list[tuple[torch.Tensor, int]]:
    """(text batch, steps) of each run of steps: all of them on the batch given, or, where
    a guidance cutoff leaves ``guided`` steps under guidance, those on [uncond, cond] and
    the rest on the cond half (one row per image, no guidance)."""
    unguided = text_embeddings.shape[0] != 2 * latents.shape[0]
    if guided is None or guided >= steps or unguided:
        return [(text_embeddings, steps)]
    return [(text_embeddings, guided), (text_embeddings.chunk(2)[1], steps - guided)]


class StepGraphs:
    """Whole denoising steps replayed as CUDA graphs: one capture per step kind and shapes
    (any schedule, start step and guidance scale of that kind reuse it), then one replay
    per step; on a CPU the same steps run eagerly. The captures share one memory pool
    (each writes its results into its own ``StepState``; engine/cuda_graphs.py says why
    that is safe); the least recently used one is dropped beyond ``max_captures``."""

    rows = 1000  # table rows a captured step can index: a schedule of up to 1000 steps
    max_captures = 8

    def __init__(self, unet: Unet) -> None:
        self.unet = unet
        self.captured: Captures[tuple[Any, StepState]] = Captures(self.max_captures)
        self.pool = MemoryPool()

    @staticmethod
    def capturable(latents: torch.Tensor) -> bool:
        """Whether steps on these latents are captured (CUDA) or run eagerly."""
        return latents.device.type == "cuda"

    @torch.inference_mode()
    def run(
        self,
        table: StepTable,
        latents: torch.Tensor,
        text_embeddings: torch.Tensor,
        guidance_scale: float,
        guided: int | None = None,
    ) -> torch.Tensor:
        """The loop of ``table`` from ``latents``. ``guided``: the steps run under guidance
        where a guidance cutoff ends it early (the rest replay a capture on the cond half
        of the text batch, carrying on from the first's state); None: every step."""
        if not self.capturable(latents):
            return run_table(table, latents, text_embeddings, guidance_scale, self.unet, guided)
        before = None
        for texts, steps in phases(len(table), latents, text_embeddings, guided):
            graph, state = self._captured(table, latents, texts, guidance_scale)
            state.load(table, latents, texts, guidance_scale)
            if before is not None:  # the second run of steps goes on from the first
                state.carry_on(before)
            for _ in range(steps):
                graph.replay()
            before = state
        assert before is not None  # for mypy: there is always a run of steps
        return before.latents.clone()

    def _captured(
        self,
        table: StepTable,
        latents: torch.Tensor,
        text_embeddings: torch.Tensor,
        guidance_scale: float,
    ) -> tuple[Any, StepState]:
        """The capture of a step of ``table``'s kind on these shapes: made once, on first
        sight (the guidance follows the text batch: [uncond, cond] rows, or the cond rows)."""
        do_guidance = text_embeddings.shape[0] == 2 * latents.shape[0]

        def captured_step() -> tuple[Any, StepState]:
            # Noise rows cost a latent each: an ancestral kind's are sized to its schedule.
            rows = len(table) if table.kind.noise else max(self.rows, len(table))
            state = StepState.like(table, latents, text_embeddings, rows)
            # The warm run before capture steps real values (then reloaded by the caller).
            state.load(table, latents, text_embeddings, guidance_scale)
            step = lambda: table_step(table.kind, state, self.unet, do_guidance)  # noqa: E731
            graph, _ = capture(step, self.pool)
            return graph, state

        key = (table.kind, table.timesteps.dtype, latents.shape, text_embeddings.shape)
        return self.captured.get(
            key, captured_step, fits=lambda entry: len(table) <= entry[1].table.shape[0]
        )
