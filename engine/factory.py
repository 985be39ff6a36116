"""Backends from their typed options. The only place that knows which backends exist and
what each needs from the machine."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sdtrt.engine.base import Backend
from sdtrt.errors import BackendUnavailableError, InvalidInputError
from sdtrt.export.folder import ExportedModel
from sdtrt.options import BackendOptions, CacheOptions, OrtOptions, TensorRTOptions, TorchOptions


def check_available(options: BackendOptions) -> None:
    """Nothing, or a clear error saying what this machine lacks for ``options``: called
    before any model is loaded or exported."""
    if isinstance(options, TorchOptions):
        if options.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise BackendUnavailableError(
                    f"--device cuda needs an NVIDIA GPU and a CUDA build of torch; "
                    f"torch {torch.__version__} sees no GPU here"
                )
    elif isinstance(options, OrtOptions):
        if options.device == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailableError(
                    "ONNX Runtime's CUDA provider is not installed: pip install onnxruntime-gpu "
                    f"(available here: {', '.join(ort.get_available_providers())})"
                )
    else:
        from sdtrt.engine.trt_build import require_tensorrt

        require_tensorrt(options.family)


def backend_from_components(
    components: dict[str, Any], options: BackendOptions, cache: CacheOptions = CacheOptions()
) -> Backend:
    """A backend for PyTorch components; graph backends export (and build) into the cache
    once and reuse it."""
    check_available(options)  # before minutes of export, not after
    if isinstance(options, TorchOptions):
        from sdtrt.engine.torch_backend import TorchBackend

        return TorchBackend(components, options)
    from sdtrt.export.cache import exported_for

    if isinstance(options, TensorRTOptions) and options.engine_dir is None:
        # Cache-managed engines are built when missing; engines of a folder the user
        # exported or named (--engine-dir) are theirs to build (`sdtrt build`), and a
        # mismatch there is an error.
        options = replace(options, build_missing=True)
    exported = exported_for(components, precision=options.precision, cache=cache)
    return backend_from_exported(exported, options)


def backend_from_exported(exported: ExportedModel, options: BackendOptions) -> Backend:
    """A backend on an exported folder's graphs (each backend checks the machine itself)."""
    if isinstance(options, TorchOptions):
        raise InvalidInputError(
            "the torch backend needs PyTorch weights, not an exported ONNX folder: "
            "pass the diffusers folder or model name instead"
        )
    if isinstance(options, OrtOptions):
        from sdtrt.engine.ort_backend import OrtBackend

        return OrtBackend(exported, options)
    from sdtrt.engine.trt_backend import TensorRTBackend

    return TensorRTBackend(exported, options)
