"""TensorRT optimisation profiles from user ranges, and the check that a request fits one.

Pure Python: no TensorRT needed, so every rule here is tested on CPU.
"""

from __future__ import annotations

from typing import Any

from sdtrt.errors import ShapeOutsideProfileError
from sdtrt.export.networks import Network
from sdtrt.options import BuildRanges

Shape = tuple[int, ...]


def network_profile(network: Network, ranges: BuildRanges) -> dict[str, dict[str, Shape]]:
    """min/opt/max shape of each dynamic input. The UNet's batch axis is 2B (cond and
    uncond), latent sizes are pixels / 8: ``network.shapes`` knows both. The 2B axis goes
    down to B at its min: a call without guidance (``guidance_scale <= 1``, as diffusers
    skips it) has one row per image, so the fewest images make B rows, not 2B."""
    ranges.check(network.dims.size_multiple)
    shapes = {k: network.shapes(*v) for k, v in ranges.extremes().items()}
    dynamic = [n for n, axes in network.inputs.items() if any(isinstance(a, tuple) for a in axes)]
    profile = {name: {k: shapes[k][name] for k in ("min", "opt", "max")} for name in dynamic}
    if not ranges.static:
        for name in dynamic:
            if network.inputs[name][0] == ("2B", 1):
                profile[name]["min"] = (ranges.batch[0], *profile[name]["min"][1:])
    return profile


def profile_to_json(profile: dict[str, dict[str, Shape]]) -> dict[str, Any]:
    return {n: {k: list(v) for k, v in s.items()} for n, s in profile.items()}


def max_rows(profile: dict[str, Any]) -> int:
    """The most rows (the first axis: prompts, images, or the UNet's 2B) one call on an
    engine with this profile takes."""
    return min(int(shapes["max"][0]) for shapes in profile.values())


def check_request(network: str, profile: dict[str, Any], shapes: dict[str, Shape]) -> None:
    """Refuse a request outside the profile before TensorRT sees it."""
    for name, shape in shapes.items():
        if name not in profile:
            continue
        low, high = tuple(profile[name]["min"]), tuple(profile[name]["max"])
        if len(shape) != len(low) or any(
            not lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)
        ):
            hint = ""
            if network == "unet" and len(shape) == len(low) and shape[0] < low[0]:
                hint = " (the UNet's batch is 2B: cond and uncond for each image; B unguided)"
            raise ShapeOutsideProfileError(
                f"{network}: input {name} of shape {tuple(shape)} is outside the engine's "
                f"profile, which allows {low} to {high}{hint}; rebuild with wider ranges "
                "(sdtrt build --batch/--height/--width)"
            )
