"""TensorRT optimisation profiles from user ranges, and the check that a request fits one.

Pure Python: no TensorRT needed, so every rule here is tested on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdtrt.errors import InvalidInputError, ShapeOutsideProfileError
from sdtrt.export.networks import Network

Shape = tuple[int, ...]


@dataclass(frozen=True)
class BuildRanges:
    """What engines must accept, in the user's units: images per request and pixels."""

    batch: tuple[int, int] = (1, 4)
    height: tuple[int, int] = (256, 768)
    width: tuple[int, int] = (256, 768)
    opt_batch: int = 1
    opt_height: int = 512
    opt_width: int = 512
    static: bool = False
    """min = opt = max at the opt values: the lowest latency, one shape only."""

    def check(self, size_multiple: int) -> None:
        for what, (low, high), opt in (
            ("batch", self.batch, self.opt_batch),
            ("height", self.height, self.opt_height),
            ("width", self.width, self.opt_width),
        ):
            if not 1 <= low <= high:
                raise InvalidInputError(f"{what} range {low}-{high} must satisfy 1 <= min <= max")
            if not self.static and not low <= opt <= high:
                raise InvalidInputError(f"opt {what} {opt} is outside its range {low}-{high}")
            if what != "batch":
                for value in (low, high, opt):
                    if value % size_multiple:
                        raise InvalidInputError(
                            f"{what} {value} is not a multiple of {size_multiple} px, which "
                            "these graphs need"
                        )

    def extremes(self) -> dict[str, tuple[int, int, int]]:
        """(batch, height, width) at min, opt and max."""
        opt = (self.opt_batch, self.opt_height, self.opt_width)
        if self.static:
            return {"min": opt, "opt": opt, "max": opt}
        return {
            "min": (self.batch[0], self.height[0], self.width[0]),
            "opt": opt,
            "max": (self.batch[1], self.height[1], self.width[1]),
        }


def network_profile(network: Network, ranges: BuildRanges) -> dict[str, dict[str, Shape]]:
    """min/opt/max shape of each dynamic input. The UNet's batch axis is 2B (cond and
    uncond), latent sizes are pixels / 8: ``network.shapes`` knows both."""
    ranges.check(network.dims.size_multiple)
    shapes = {k: network.shapes(*v) for k, v in ranges.extremes().items()}
    dynamic = [n for n, axes in network.inputs.items() if any(isinstance(a, tuple) for a in axes)]
    return {name: {k: shapes[k][name] for k in ("min", "opt", "max")} for name in dynamic}


def profile_to_json(profile: dict[str, dict[str, Shape]]) -> dict[str, Any]:
    return {n: {k: list(v) for k, v in s.items()} for n, s in profile.items()}


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
                hint = " (the UNet's batch is 2B: cond and uncond for each image)"
            raise ShapeOutsideProfileError(
                f"{network}: input {name} of shape {tuple(shape)} is outside the engine's "
                f"profile, which allows {low} to {high}{hint}; rebuild with wider ranges "
                "(sdtrt build --batch/--height/--width)"
            )
