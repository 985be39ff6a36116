"""Backends by name. The only place that knows which backends exist."""

from __future__ import annotations

from typing import Any

from sdtrt.engine.base import Backend
from sdtrt.errors import InvalidInputError

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise InvalidInputError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")


def backend_from_components(name: str, components: dict[str, Any], **options: Any) -> Backend:
    """A backend for PyTorch components; graph backends export (and build) into the cache
    once and reuse it."""
    _check_name(name)
    if name == "torch":
        from sdtrt.engine.torch_backend import TorchBackend

        return TorchBackend(components, **options)
    from sdtrt.export.cache import exported_for

    if name == "tensorrt":
        from sdtrt.engine.trt_build import BuildOptions, require_tensorrt

        require_tensorrt()  # before minutes of export, not after
        # Cache-managed engines are built when missing; engines of a folder the user
        # exported are theirs to build (`sdtrt build`), and a mismatch there is an error.
        options.setdefault("build", BuildOptions())
    cache_options = {k: options.pop(k) for k in ("opset", "cache_dir", "source") if k in options}
    precision = options.setdefault("precision", default_precision(name))
    exported = exported_for(components, precision=precision, **cache_options)
    return backend_from_exported(name, exported, **options)


def default_precision(backend: str) -> str:
    """TensorRT's product is fp16 engines; ONNX Runtime on CPU is fastest and exact in fp32."""
    return "fp16" if backend == "tensorrt" else "fp32"


def backend_from_exported(name: str, exported: Any, **options: Any) -> Backend:
    _check_name(name)
    if name == "torch":
        raise InvalidInputError(
            "the torch backend needs PyTorch weights, not an exported ONNX folder: "
            "pass the diffusers folder or model name instead"
        )
    if name == "onnxruntime":
        from sdtrt.engine.ort_backend import OrtBackend

        return OrtBackend(exported, **options)
    from sdtrt.engine.trt_backend import TensorRTBackend

    return TensorRTBackend(exported, **options)
