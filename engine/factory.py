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

    cache_options = {k: options.pop(k) for k in ("opset", "cache_dir", "source") if k in options}
    precision = options.get("precision", "fp32")
    exported = exported_for(components, precision=precision, **cache_options)
    return backend_from_exported(name, exported, **options)


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
