"""ONNX -> TensorRT engines with polygraphy's loaders: strongly typed networks (precision
comes from the graph: TensorRT 11 has no FP16 builder flag), one profile, and the keyed
engine cache. Standard TensorRT builds on the GPU and keeps a timing cache; TensorRT-RTX
builds on any machine for its target compute capabilities (engine/trt_family.py)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from sdtrt.engine.trt_cache import EngineKey, cached_engine, find_engine
from sdtrt.engine.trt_family import (
    NAMES,
    builds_without_gpu,
    family_version,
    targets_text,
    trt_module,
    use_polygraphy_family,
)
from sdtrt.engine.trt_profile import network_profile, profile_to_json
from sdtrt.errors import BackendUnavailableError, EngineBuildError, EngineMismatchError
from sdtrt.export.folder import ExportedModel
from sdtrt.export.networks import NETWORK_NAMES
from sdtrt.options import BuildOptions

logger = logging.getLogger(__name__)


def tensorrt_version() -> str | None:
    """Standard TensorRT's version, or None where it is not (really) installed."""
    return family_version("tensorrt")


def require_tensorrt(family: str = "tensorrt", *, gpu: bool = True) -> None:
    """Nothing, or a clear error saying what is missing and how to get it. ``gpu=False``:
    only for building, which TensorRT-RTX does without one."""
    trt_module(family)
    if not gpu and builds_without_gpu(family):
        return
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"{NAMES[family]} needs an NVIDIA GPU with CUDA, and torch sees none on this machine"
            + ("" if gpu else "; TensorRT-RTX (--backend tensorrt-rtx) builds without one")
        )


def gpu_identity() -> tuple[str, str]:
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.name, f"{props.major}.{props.minor}"


def engine_key(
    exported: ExportedModel,
    network: str,
    precision: str,
    options: BuildOptions,
    family: str = "tensorrt",
) -> EngineKey:
    """What an engine is built from and for. A standard engine is for this GPU; an RTX
    engine for its targets, whatever GPU (if any) builds it."""
    trt = trt_module(family)
    if builds_without_gpu(family):
        targets = (gpu_identity()[1],) if options.targets == ("gpu",) else options.targets
        name, cc = "", targets_text(targets)
    else:
        if options.targets:
            raise BackendUnavailableError(
                "--targets is for TensorRT-RTX: standard TensorRT builds for this GPU only"
            )
        name, cc = gpu_identity()
    contract = exported.network(network, precision)
    return EngineKey(
        network=network,
        graph_sha256=exported.graph_sha256(network, precision),
        precision=exported.network_precision(network, precision),
        tensorrt_version=trt.__version__,
        gpu_name=name,
        compute_capability=cc,
        family=family,
        profile=profile_to_json(network_profile(contract, options.ranges)),
        build_flags={**options.flags(), **family_flags(family)},
    )


def family_flags(family: str) -> dict[str, bool]:
    """Builder flags a family's engines always get. TensorRT-RTX: REQUIRE_USER_ALLOCATION,
    without which its engines cannot be captured in a CUDA graph (TensorRT-RTX 1.2 notes);
    sdtrt gives every context its memory anyway."""
    return {"require_user_allocation": True} if builds_without_gpu(family) else {}


def default_engine_dir(exported: ExportedModel) -> Path:
    return exported.root / "tensorrt"


def build_engines(
    exported: ExportedModel,
    precision: str,
    options: BuildOptions,
    engine_dir: Path | None = None,
    networks: tuple[str, ...] = NETWORK_NAMES,
    family: str = "tensorrt",
) -> dict[str, Path]:
    """Build (or reuse) one engine per network; returns their paths."""
    require_tensorrt(family, gpu=False)
    use_polygraphy_family(family)
    engine_dir = engine_dir or default_engine_dir(exported)
    timing_cache = None
    if not builds_without_gpu(family):  # TensorRT-RTX has no timing cache (deprecated there)
        cc = gpu_identity()[1].replace(".", "")
        timing_cache = engine_dir / f"timing.trt{tensorrt_version()}.sm{cc}.cache"
    paths = {}
    for network in networks:
        key = engine_key(exported, network, precision, options, family)
        onnx_path = exported.graph_path(network, precision)
        paths[network] = cached_engine(
            engine_dir,
            key,
            functools.partial(_build, onnx_path, key, options, timing_cache),
        )
    return paths


def build_missing_engines(
    exported: ExportedModel,
    precision: str,
    engine_dir: Path,
    family: str = "tensorrt",
    gpu: tuple[str, str] | None = None,
) -> tuple[str, ...]:
    """What a run on the export cache builds: each network's engine with the default
    profile, only where the folder holds none that fits this machine and graph, so engines
    ``sdtrt build`` made there with ranges of its own are run, not built over. Returns the
    networks built."""
    missing = []
    for network in NETWORK_NAMES:
        key = engine_key(exported, network, precision, BuildOptions(), family)
        try:
            find_engine(engine_dir, key, gpu)
        except EngineMismatchError:
            missing.append(network)
    if missing:
        build_engines(exported, precision, BuildOptions(), engine_dir, tuple(missing), family)
    return tuple(missing)


def _build(
    onnx_path: Path, key: EngineKey, options: BuildOptions, timing_cache: Path | None
) -> bytes:
    from polygraphy.backend.trt import Profile, engine_bytes_from_network
    from polygraphy.logger import G_LOGGER

    trt = trt_module(key.family)
    profile = Profile()
    for name, shapes in key.profile.items():
        profile.add(name, min=shapes["min"], opt=shapes["opt"], max=shapes["max"])
    limits = None
    if options.workspace_gb:
        limits = {trt.MemoryPoolType.WORKSPACE: int(options.workspace_gb * 2**30)}
    common: dict[str, Any] = dict(
        profiles=[profile],
        builder_optimization_level=options.optimization_level,
        memory_pool_limits=limits,
    )
    save: dict[str, Any] = {}
    if timing_cache is None:
        from polygraphy.backend.tensorrt_rtx.config import CreateConfigRTX
        from polygraphy.backend.trt import PostprocessConfig

        targets = [] if "+" in key.compute_capability else key.compute_capability.split(",")
        config: Any = CreateConfigRTX(
            compute_capabilities=[tuple(int(p) for p in t.split(".")) for t in targets] or None,
            **common,
        )
        if key.build_flags.get("require_user_allocation"):
            flag = trt.BuilderFlag.REQUIRE_USER_ALLOCATION
            config = PostprocessConfig(config, lambda builder, network, cfg: cfg.set_flag(flag))
    else:
        from polygraphy.backend.trt import CreateConfig

        load = str(timing_cache) if _timing_cache_usable(timing_cache) else None
        config = CreateConfig(load_timing_cache=load, **common)
        save = {"save_timing_cache": str(timing_cache)}
    what = f"{key.family} could not build {key.network} from {onnx_path}"
    try:
        network = _parse(trt, onnx_path)
        with G_LOGGER.verbosity(G_LOGGER.WARNING):  # polygraphy's INFO is a page per engine
            data = engine_bytes_from_network(network, config, **save)
    except EngineBuildError as exc:
        raise EngineBuildError(f"{what}: {exc}") from None
    except Exception as exc:  # polygraphy reports parser and builder failures untyped
        if "memory" in str(exc).lower() and timing_cache is not None:
            import torch

            free, total = torch.cuda.mem_get_info()
            raise EngineBuildError(
                f"out of GPU memory building {key.network}: workspace limit "
                f"{options.workspace_gb or 'default'} GB, {free / 2**30:.1f} of "
                f"{total / 2**30:.1f} GB free; lower --workspace-gb or the ranges"
            ) from exc
        raise EngineBuildError(f"{what}: {_reason(exc)}") from exc
    if data is None:
        raise EngineBuildError(f"{what} (see its log above)")
    return bytes(data)


def _parse(trt: Any, onnx_path: Path) -> tuple[Any, Any, Any]:
    """A strongly typed network from the ONNX graph, as polygraphy's loaders take it; the
    parser's own errors (which operator, which node) when it refuses the graph."""
    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt.Logger(trt.Logger.ERROR))
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError("its ONNX parser refused the graph: " + "; ".join(errors))
    return builder, network, parser


def _parser_error(error: Any) -> str:
    """'operator NAME (node N): what the parser said'."""
    where = f"operator {error.node_operator()} (node {error.node_name() or error.node()})"
    return f"{where}: {error.desc()}"


def _reason(exc: Exception) -> str:
    """polygraphy's exception text is a log dump; its last non-empty line is the reason."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _timing_cache_usable(path: Path) -> bool:
    """A corrupt timing cache is a warning and a build without it, not a failed build."""
    if not path.is_file():
        return False
    trt = trt_module("tensorrt")
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
