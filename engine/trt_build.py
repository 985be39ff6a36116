"""ONNX -> TensorRT engines with polygraphy's loaders: strongly typed networks (precision
comes from the graph: TensorRT 11 has no FP16 builder flag), one profile, a persisted
timing cache, and the keyed engine cache."""

from __future__ import annotations

import logging
from pathlib import Path

from sdtrt.engine.trt_cache import EngineKey, cached_engine
from sdtrt.engine.trt_profile import network_profile, profile_to_json
from sdtrt.errors import BackendUnavailableError, EngineBuildError
from sdtrt.export.folder import ExportedModel
from sdtrt.export.networks import NETWORK_NAMES, networks_for
from sdtrt.options import BuildOptions

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "on an NVIDIA machine: pip install --extra-index-url https://pypi.nvidia.com 'sdtrt[tensorrt]'"
)


def tensorrt_version() -> str | None:
    """The installed TensorRT's version, or None. A real TensorRT is a module with a
    version and a Builder: a bare ``tensorrt`` namespace (type stubs, a half-removed
    install) imports fine and is not one."""
    try:
        import tensorrt
    except ImportError:
        return None
    version = getattr(tensorrt, "__version__", None)
    return str(version) if version and hasattr(tensorrt, "Builder") else None


def require_tensorrt() -> None:
    """Nothing, or a clear error saying what is missing and how to get it."""
    if tensorrt_version() is None:
        raise BackendUnavailableError(f"TensorRT is not installed ({INSTALL_HINT})")
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            "TensorRT needs an NVIDIA GPU with CUDA, and torch sees none on this machine"
        )


def gpu_identity() -> tuple[str, str]:
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.name, f"{props.major}.{props.minor}"


def engine_key(
    exported: ExportedModel, network: str, precision: str, options: BuildOptions
) -> EngineKey:
    require_tensorrt()
    import tensorrt as trt

    contract = networks_for(exported.dims)[network]
    name, cc = gpu_identity()
    return EngineKey(
        network=network,
        graph_sha256=exported.graph_sha256(network, precision),
        precision=exported.network_precision(network, precision),
        tensorrt_version=trt.__version__,
        gpu_name=name,
        compute_capability=cc,
        profile=profile_to_json(network_profile(contract, options.ranges)),
        build_flags=options.flags(),
    )


def default_engine_dir(exported: ExportedModel) -> Path:
    return exported.root / "tensorrt"


def build_engines(
    exported: ExportedModel,
    precision: str,
    options: BuildOptions,
    engine_dir: Path | None = None,
    networks: tuple[str, ...] = NETWORK_NAMES,
) -> dict[str, Path]:
    """Build (or reuse) one engine per network; returns their paths."""
    require_tensorrt()
    import tensorrt as trt

    engine_dir = engine_dir or default_engine_dir(exported)
    name, cc = gpu_identity()
    timing_cache = engine_dir / f"timing.trt{trt.__version__}.sm{cc.replace('.', '')}.cache"
    paths = {}
    for network in networks:
        key = engine_key(exported, network, precision, options)
        onnx_path = exported.graph_path(network, precision)
        paths[network] = cached_engine(
            engine_dir,
            key,
            lambda onnx_path=onnx_path, key=key: _build(onnx_path, key, options, timing_cache),
        )
    return paths


def _build(onnx_path: Path, key: EngineKey, options: BuildOptions, timing_cache: Path) -> bytes:
    import tensorrt as trt
    import torch
    from polygraphy.backend.trt import (
        CreateConfig,
        Profile,
        engine_bytes_from_network,
        network_from_onnx_path,
    )

    profile = Profile()
    for name, shapes in key.profile.items():
        profile.add(name, min=shapes["min"], opt=shapes["opt"], max=shapes["max"])
    limits = None
    if options.workspace_gb:
        limits = {trt.MemoryPoolType.WORKSPACE: int(options.workspace_gb * 2**30)}
    load_cache = str(timing_cache) if _timing_cache_usable(timing_cache) else None
    config = CreateConfig(
        profiles=[profile],
        builder_optimization_level=options.optimization_level,
        memory_pool_limits=limits,
        load_timing_cache=load_cache,
    )
    network = network_from_onnx_path(str(onnx_path), strongly_typed=True)
    try:
        data = engine_bytes_from_network(network, config, save_timing_cache=str(timing_cache))
    except Exception as exc:  # polygraphy reports TensorRT build failures untyped
        free, total = torch.cuda.mem_get_info()
        if "memory" in str(exc).lower():
            raise EngineBuildError(
                f"out of GPU memory building {key.network}: workspace limit "
                f"{options.workspace_gb or 'default'} GB, {free / 2**30:.1f} of "
                f"{total / 2**30:.1f} GB free; lower --workspace-gb or the ranges"
            ) from exc
        raise EngineBuildError(f"TensorRT could not build {key.network}: {exc}") from exc
    if data is None:
        raise EngineBuildError(f"TensorRT could not build {key.network} (see its log above)")
    return bytes(data)


def _timing_cache_usable(path: Path) -> bool:
    """A corrupt timing cache is a warning and a build without it, not a failed build."""
    if not path.is_file():
        return False
    import tensorrt as trt

    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    config = builder.create_builder_config()
    try:
        ok = config.create_timing_cache(path.read_bytes()) is not None
    except Exception:  # TensorRT raises its own untyped errors for bad caches
        ok = False
    if not ok:
        logger.warning("timing cache %s is corrupt: building without it", path)
        path.replace(path.with_suffix(".corrupt"))
    return ok
