"""Guidance cut off after a share of the steps (diffusers' ``SDCFGCutoffCallback``): the
first steps under classifier-free guidance, where the image's layout and colours are set,
the rest on the prompt's row alone, half the UNet's work per step. The Python call takes
diffusers' callback (or this one, which cuts a batch of any size); the command line and
the server take the share (``--guidance-cutoff``, the ``guidance_cutoff`` field)."""

from __future__ import annotations

from typing import Any

from diffusers.callbacks import PipelineCallback

from sdtrt.errors import InvalidInputError
from sdtrt.runtime.inputs import is_real


def check_guidance_cutoff(cutoff: Any) -> None:
    """A share of the steps in [0, 1], or None (guided throughout)."""
    if cutoff is not None and (not is_real(cutoff) or not 0 <= cutoff <= 1):
        raise InvalidInputError(
            "guidance cutoff must be a number in [0, 1], the share of the steps run under "
            f"guidance (diffusers' cutoff_step_ratio), got {cutoff!r}"
        )


def cutoff_step(steps: int, ratio: float | None, index: int | None) -> int | None:
    """The step at whose end diffusers' cutoff callback turns guidance off, in a loop of
    ``steps``: ``index``, else ``int(steps * ratio)``; None without either."""
    if index is not None:
        return int(index)
    return None if ratio is None else int(steps * ratio)


def guided_steps(steps: int, ratio: float | None = None, index: int | None = None) -> int:
    """How many of the ``steps`` the loop runs are guided under a cutoff: the cutoff step
    and those before it; all of them without a cutoff, or with one at no step the loop runs
    (past the last, or a negative index: the callback never sees it)."""
    cutoff = cutoff_step(steps, ratio, index)
    return cutoff + 1 if cutoff is not None and 0 <= cutoff < steps else steps


class GuidanceCutoffCallback(PipelineCallback):
    """diffusers' ``SDCFGCutoffCallback`` for a batch of any size: at the end of step
    ``int(pipe.num_timesteps * cutoff_step_ratio)`` (or of ``cutoff_step_index``) guidance
    goes off and the text batch keeps its cond half, one row per image (diffusers' keeps the
    last row: one image's). For one image the two are the same callback."""

    tensor_inputs = ["prompt_embeds"]

    def callback_fn(
        self, pipeline: Any, step_index: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        ratio, index = self.config["cutoff_step_ratio"], self.config["cutoff_step_index"]
        cutoff = cutoff_step(pipeline.num_timesteps, ratio, index)
        if step_index == cutoff and pipeline.do_classifier_free_guidance:
            pipeline._guidance_scale = 0.0
            callback_kwargs["prompt_embeds"] = callback_kwargs["prompt_embeds"].chunk(2)[1]
        return callback_kwargs


def cutoff_callback(ratio: float | None) -> GuidanceCutoffCallback | None:
    """The callback that cuts guidance off after ``ratio`` of the steps (a checked share,
    what ``--guidance-cutoff`` gives); None for None."""
    return None if ratio is None else GuidanceCutoffCallback(cutoff_step_ratio=float(ratio))
