"""diffusers' step-end callbacks (``callback_on_step_end``) in sdtrt's loop: the tensors a
callback may be given, what it may return, the guidance it may leave (``pipe._guidance_scale``
read after each step, as diffusers reads it: off, the UNet runs on the prompts' rows alone), and
the one callback the tabulated steps run without calling (sdtrt's guidance cutoff)."""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback, SDCFGCutoffCallback

from sdtrt.errors import InvalidInputError
from sdtrt.runtime.guidance import GuidanceCutoffCallback, guided_steps
from sdtrt.runtime.inputs import is_real

# What a step-end callback may ask for (diffusers' _callback_tensor_inputs): the latents after
# the step, the UNet's text batch ([uncond, cond] under guidance), the negative half alone.
CALLBACK_TENSORS = ("latents", "prompt_embeds", "negative_prompt_embeds")


def callback_inputs(callback: Any, names: Any) -> tuple[str, ...]:
    """The tensors a step-end callback is given (none without one), checked: diffusers'
    names only. diffusers' callback objects (``SDCFGCutoffCallback``, several in
    ``MultiPipelineCallbacks``) name their own, in place of the names given."""
    if callback is None:
        return ()
    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        names = callback.tensor_inputs
    if not callable(callback):
        raise InvalidInputError(
            "callback_on_step_end must be a function (pipe, step, timestep, tensors) -> dict, "
            f"got {type(callback).__name__}"
        )
    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise InvalidInputError(
            f"callback_on_step_end_tensor_inputs must be a list of names, got {names!r}"
        )
    unknown = [name for name in names if name not in CALLBACK_TENSORS]
    if unknown:
        raise InvalidInputError(
            f"callback_on_step_end_tensor_inputs may name {', '.join(CALLBACK_TENSORS)}; "
            f"got {', '.join(map(repr, unknown))}"
        )
    return tuple(names)


def guidance_left(scale: Any) -> float:
    """The guidance scale a callback left in ``pipe._guidance_scale``, checked."""
    if not is_real(scale) or not math.isfinite(scale):
        raise InvalidInputError(
            f"callback_on_step_end set pipe._guidance_scale to {scale!r}: give a finite "
            "number (above 1: guidance on; 1 or less: off, the prompts' rows alone)"
        )
    return float(scale)


def tabulated_cutoff(callback: Any, steps: int, images: int) -> int | None:
    """The steps run under guidance where the callback is sdtrt's guidance cutoff as it is
    (not a subclass, which may do more), or diffusers' for one image (whose last text row
    is then the cond half: the same cutoff): the tabulated loop runs it without calling it.
    None: no cutoff, or a callback to call."""
    ours = type(callback) is GuidanceCutoffCallback
    if not ours and (type(callback) is not SDCFGCutoffCallback or images != 1):
        return None
    config = callback.config
    return guided_steps(steps, config["cutoff_step_ratio"], config["cutoff_step_index"])


def step_end_outputs(
    changed: Any, latents: torch.Tensor, text_embeddings: torch.Tensor, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents and text batch a step-end callback returned (diffusers' dict; a tensor
    left out is kept). The latents keep their shape: the loop's batch is fixed. The text
    batch has ``rows``, what the guidance the callback left needs: [uncond, cond] (2B) on,
    the cond rows (B) off. (The negative prompt's embeddings it may return change nothing,
    as in diffusers: the text batch holds them from the start.)"""
    if not isinstance(changed, dict):
        raise InvalidInputError(
            "callback_on_step_end must return a dict (the tensors it changes, or {}), "
            f"got {type(changed).__name__}"
        )
    kept = []
    texts_shape = (rows, *text_embeddings.shape[1:])
    for name, before, shape in (
        ("latents", latents, latents.shape),
        ("prompt_embeds", text_embeddings, texts_shape),
    ):
        after = changed.get(name, before)
        if not isinstance(after, torch.Tensor) or after.shape != shape:
            what = list(after.shape) if isinstance(after, torch.Tensor) else type(after).__name__
            raise InvalidInputError(
                f"callback_on_step_end returned {name} {what}; expected a tensor of shape "
                f"{list(shape)}" + (_TEXT_ROWS if name == "prompt_embeds" else ", as it was given")
            )
        kept.append(after.to(before.device, before.dtype))
    return kept[0], kept[1]


_TEXT_ROWS = (
    " ([uncond, cond] rows while guidance is on, the cond rows alone once pipe._guidance_scale"
    " is 1 or less; diffusers' SDCFGCutoffCallback keeps one row, prompt_embeds[-1:], which"
    " is the cond half for one image: for more, prompt_embeds.chunk(2)[1])"
)
