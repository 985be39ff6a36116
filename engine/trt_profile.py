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


PixelRange = tuple[tuple[int, int], tuple[int, int]]
"""(lowest, highest) height and (lowest, highest) width in pixels."""


def pixel_range(engines: list[tuple[Network, dict[str, Any]]]) -> PixelRange | None:
    """The heights and widths that every one of these engines (contract, stored profile)
    takes; None where none has a spatial axis. Each engine is found on its own, so their
    profiles may come from different builds: the range is what they share."""
    f = engines[0][0].dims.vae_scale_factor if engines else 1
    scale = {"H": ("H", 1), "W": ("W", 1), "h": ("H", f), "w": ("W", f)}
    bounds: dict[str, list[tuple[int, int]]] = {"H": [], "W": []}
    for network, profile in engines:
        for name, axes in network.inputs.items():
            for i, axis in enumerate(axes):
                if name in profile and isinstance(axis, tuple) and axis[0] in scale:
                    side, factor = scale[axis[0]]
                    low, high = profile[name]["min"][i], profile[name]["max"][i]
                    bounds[side].append((int(low) * factor, int(high) * factor))
    if not bounds["H"] or not bounds["W"]:
        return None

    def shared(spans: list[tuple[int, int]]) -> tuple[int, int]:
        return max(low for low, _ in spans), min(high for _, high in spans)

    return shared(bounds["H"]), shared(bounds["W"])


def check_pixels(height: int, width: int, allowed: PixelRange | None) -> None:
    """Refuse an image size the engines' profiles do not take, before any work."""
    if allowed is None:
        return
    (h_low, h_high), (w_low, w_high) = allowed
    if h_low > h_high or w_low > w_high:
        raise ShapeOutsideProfileError(
            "the loaded engines take no size in common (their profiles come from builds with "
            "different --height/--width ranges); rebuild them with one range (sdtrt build)"
        )
    if not (h_low <= height <= h_high and w_low <= width <= w_high):
        raise ShapeOutsideProfileError(
            f"{height}x{width} px (height x width) is outside the engines' profiles, which take "
            f"heights {h_low}-{h_high} and widths {w_low}-{w_high} px; rebuild with wider "
            "ranges (sdtrt build --height/--width)"
        )


def padded_shapes(
    network: Network, profile: dict[str, Any], shapes: dict[str, Shape]
) -> tuple[int, dict[str, Shape]] | None:
    """A call of fewer rows than the engine's profile takes at least (a static engine takes
    one row count; a build with ``--batch 2-4`` at least 2 images), raised to that least:
    (the call's rows, the shapes the engine runs), the rows past the call's
    (``fill_rows``) left out of its answer. None where the call fits as it is. Padding,
    not refusal: a server's step of fewer rows than a static engine's, or an unguided call
    (one row per image), then runs, at the cost of the engine's shape."""
    batched = [
        name
        for name, shape in shapes.items()
        if name in profile and shape and isinstance(network.inputs[name][0], tuple)
    ]
    if not batched:
        return None
    rows = shapes[batched[0]][0]
    least = max(int(profile[name]["min"][0]) for name in batched)
    if not 0 < rows < least:
        return None
    return rows, {n: (least, *s[1:]) if n in batched else s for n, s in shapes.items()}


def fill_rows(buffer: Any, tensor: Any) -> None:
    """``tensor`` copied into the first rows of ``buffer`` (an engine's input, on the
    stream); rows past it, where ``padded_shapes`` raised the call, are copies of its last
    row, so that the padding is inputs the network takes as any other (rows are computed
    apart: they do not change the call's own)."""
    rows = tensor.shape[0] if tensor.dim() else 0
    if tensor.dim() == 0 or buffer.shape[0] == rows:
        buffer.copy_(tensor, non_blocking=True)
        return
    buffer[:rows].copy_(tensor, non_blocking=True)
    buffer[rows:].copy_(tensor[-1:].expand_as(buffer[rows:]), non_blocking=True)


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
