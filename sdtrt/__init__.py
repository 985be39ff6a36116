"""sdtrt: Stable Diffusion img2img on TensorRT, ONNX Runtime and PyTorch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "SAMPLE_IMAGE",
    "GuidanceCutoffCallback",
    "Img2ImgPipeline",
    "ModelSource",
    "OrtOptions",
    "TensorRTOptions",
    "TorchOptions",
    "build_pipeline",
    "load_components",
    "__version__",
]

if TYPE_CHECKING:
    from sdtrt.api import build_pipeline
    from sdtrt.models import load_components
    from sdtrt.runtime.guidance import GuidanceCutoffCallback
    from sdtrt.runtime.pipeline import Img2ImgPipeline


# Light (no torch): what the Python API is called with.
from sdtrt.options import (  # noqa: E402
    SAMPLE_IMAGE,
    OrtOptions,
    TensorRTOptions,
    TorchOptions,
)
from sdtrt.source import ModelSource


def __getattr__(name: str) -> Any:
    # Lazy: `import sdtrt` (and the CLI's --help) must not pay for torch and diffusers.
    if name == "Img2ImgPipeline":
        from sdtrt.runtime.pipeline import Img2ImgPipeline

        return Img2ImgPipeline
    if name == "load_components":
        from sdtrt.models import load_components

        return load_components
    if name == "GuidanceCutoffCallback":
        from sdtrt.runtime.guidance import GuidanceCutoffCallback

        return GuidanceCutoffCallback
    if name == "build_pipeline":
        from sdtrt.api import build_pipeline

        return build_pipeline
    raise AttributeError(f"module 'sdtrt' has no attribute {name!r}")
