"""Public entry points: one call from a model name or folder to a ready pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdtrt.errors import InvalidInputError
from sdtrt.runtime.pipeline import Img2ImgPipeline

DTYPES = {"fp32": "float32", "fp16": "float16"}


def is_exported_folder(model: str | Path) -> bool:
    return Path(model, "sdtrt.json").is_file()


def build_pipeline(
    model: str,
    *,
    backend: str = "torch",
    scheduler: str = "lms",
    precision: str | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    cuda_graphs: bool = False,
    show_progress: bool = True,
) -> Img2ImgPipeline:
    """A pipeline for a built-in model name, a diffusers folder or an exported folder.
    ``precision`` picks the graphs of graph backends (default: fp16 for TensorRT, else fp32);
    ``device``/``dtype`` configure the torch backend."""
    import torch

    from sdtrt.models import load_components

    if dtype not in DTYPES:
        raise InvalidInputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    options: dict[str, Any]
    if backend == "torch":
        options = {"device": device, "dtype": getattr(torch, DTYPES[dtype])}
    else:
        from sdtrt.engine.factory import default_precision

        options = {"precision": precision or default_precision(backend)}
    if cuda_graphs:
        options["cuda_graphs"] = True
    if is_exported_folder(model):
        options.pop("device", None)
        options.pop("dtype", None)
        return Img2ImgPipeline.from_pretrained(
            model, backend=backend, scheduler=scheduler, show_progress=show_progress, **options
        )
    if backend != "torch":
        options["source"] = model
    return Img2ImgPipeline.from_components(
        load_components(model),
        backend=backend,
        scheduler=scheduler,
        show_progress=show_progress,
        **options,
    )
