"""LoRA weights fused into a model as it loads: diffusers reads the file (its own, kohya's
or PEFT's layout) and fuses it, as ``load_lora_weights`` then ``fuse_lora`` do; what is left
is the plain model with changed weights, which every backend runs and exports as it is."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from sdtrt.errors import BackendUnavailableError, InvalidInputError, ModelNotFoundError

logger = logging.getLogger(__name__)


def fuse_loras(
    components: dict[str, Any], loras: tuple[tuple[str, float], ...], allow_pickle: bool
) -> None:
    """Fuse each (file, scale) of ``loras`` into the UNet and text encoder, in place."""
    try:
        import peft  # noqa: F401  diffusers loads LoRA layers through it
    except ImportError:
        raise BackendUnavailableError(
            "LoRA weights are loaded by diffusers through peft, which is not installed: "
            "pip install 'sdtrt[lora]'"
        ) from None
    from sdtrt.models import quiet_loaders

    with quiet_loaders():  # the pipeline module's import: transformers' torchvision notes
        from diffusers import StableDiffusionPipeline

    # A container for diffusers' LoRA loader, which works on a pipeline's components.
    pipe: Any = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    names = []
    for index, (path, _) in enumerate(loras):
        name = f"lora{index}"
        state_dict = _read(Path(path), allow_pickle)
        # diffusers warns of every other adapter's keys as "missing" when a second loads.
        with quiet_loaders(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                pipe.load_lora_weights(state_dict, adapter_name=name)
            except (ValueError, RuntimeError, KeyError, TypeError) as exc:
                lines = str(exc).strip().splitlines()  # one per layer that does not fit
                why = " ".join(lines[:2])[:400] + (
                    f" (and {len(lines) - 2} more)" * (len(lines) > 2)
                )
                raise InvalidInputError(f"LoRA {path} does not fit this model: {why}") from None
        changed = [part for part, found in pipe.get_list_adapters().items() if name in found]
        if not changed:
            raise InvalidInputError(
                f"LoRA {path} changes no layer of this model: none of its keys name a layer "
                "of this UNet or text encoder (a LoRA for another architecture, SDXL or SD 2 "
                "for SD 1.x?)"
            )
        logger.info("LoRA %s: %s", path, ", ".join(changed))
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=names)
    pipe.unload_lora_weights()  # the LoRA layers go; the fused weights stay


def _read(path: Path, allow_pickle: bool) -> dict[str, Any]:
    """A LoRA file's tensors: safetensors, or a pickle (``.bin``, ``.pt``, ``.ckpt``) with
    ``allow_pickle`` only, read by torch's restricted unpickler."""
    if not path.is_file():
        raise ModelNotFoundError(f"LoRA file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:  # safetensors raises its own error types
            message = f"LoRA {path} is not a readable safetensors file: {exc}"
            raise InvalidInputError(message) from None
    if not allow_pickle:
        raise InvalidInputError(
            f"LoRA {path} is not .safetensors: a pickle, and unpickling runs code from the "
            "file; load it with --allow-pickle (ModelSource(allow_pickle=True)) if you trust it"
        )
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle's and torch's own error types
        raise InvalidInputError(f"LoRA {path} is not a readable tensor file: {exc}") from None
    if not isinstance(state, dict):
        raise InvalidInputError(f"LoRA {path} holds a {type(state).__name__}, not tensors")
    return dict(state.get("state_dict", state))
