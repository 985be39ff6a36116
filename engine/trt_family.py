"""The two TensorRT families, and every difference between them, in one place.

Standard TensorRT (module ``tensorrt``) builds on, and for, the GPU it runs on: an engine is
tied to that GPU model, and a timing cache speeds up rebuilds. TensorRT for RTX (module
``tensorrt_rtx``) builds ahead of time on any machine, GPU or not, for a set of compute
capabilities (by default 8.0, 8.6, 8.9, 12.0 and later), and compiles its kernels on the GPU
at first run (JIT), keeping them in a runtime cache. Their Python APIs agree on everything
else sdtrt uses. polygraphy picks its family once, from ``POLYGRAPHY_USE_TENSORRT_RTX``, when
its TensorRT backend is first imported: ``use_polygraphy_family`` makes that choice explicit.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from sdtrt.errors import BackendUnavailableError, EngineMismatchError
from sdtrt.fileio import atomic_path
from sdtrt.options import TRT_FAMILIES

logger = logging.getLogger(__name__)

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
NAMES = {"tensorrt": "TensorRT", "tensorrt-rtx": "TensorRT-RTX"}
INSTALL_HINTS = {
    "tensorrt": "on an NVIDIA machine: pip install --extra-index-url https://pypi.nvidia.com "
    "'sdtrt[tensorrt]'",
    "tensorrt-rtx": "pip install 'sdtrt[rtx]' (TensorRT for RTX, from the package registry)",
}
# TensorRT-RTX's default targets when none are named (its docs: 8.0, 8.6, 8.9, 12.0 and
# later; "12.0+" is how the key says "and later").
RTX_PORTABLE = ("8.0", "8.6", "8.9", "12.0+")
_POLYGRAPHY_SWITCH = "POLYGRAPHY_USE_TENSORRT_RTX"


def family_version(family: str) -> str | None:
    """The installed family's version, or None. A real TensorRT is a module with a version
    and a Builder: a bare namespace (type stubs, a half-removed install) is not one."""
    try:
        module = importlib.import_module(MODULES[family])
    except ImportError:
        return None
    version = getattr(module, "__version__", None)
    return str(version) if version and hasattr(module, "Builder") else None


def trt_module(family: str) -> Any:
    """The family's module, or a clear error saying how to install it."""
    if family not in TRT_FAMILIES:
        raise BackendUnavailableError(f"unknown TensorRT family {family!r}")
    if family_version(family) is None:
        raise BackendUnavailableError(f"{NAMES[family]} is not installed ({INSTALL_HINTS[family]})")
    return importlib.import_module(MODULES[family])


def builds_without_gpu(family: str) -> bool:
    return family == "tensorrt-rtx"


def use_polygraphy_family(family: str) -> None:
    """Point polygraphy at ``family`` before its TensorRT backend is imported; one family
    per process: polygraphy cannot switch once it has imported one."""
    wanted = family == "tensorrt-rtx"
    if "polygraphy.backend.trt" in sys.modules:
        from polygraphy import config

        if bool(config.USE_TENSORRT_RTX) != wanted:
            current = "tensorrt-rtx" if config.USE_TENSORRT_RTX else "tensorrt"
            raise BackendUnavailableError(
                f"this process already uses {current} through polygraphy, which cannot switch "
                f"to {family}: run {family} in a process of its own"
            )
        return
    os.environ[_POLYGRAPHY_SWITCH] = "1" if wanted else "0"
    if "polygraphy.config" in sys.modules:  # imported (by a runner) but not its TRT backend
        from polygraphy import config

        config.USE_TENSORRT_RTX = wanted


def targets_text(targets: tuple[str, ...]) -> str:
    """What an RTX engine targets, as its key records it: "8.0,8.6,8.9,12.0+" by default."""
    return ",".join(targets or RTX_PORTABLE)


def runs_on(targets: str, compute_capability: str) -> bool:
    """Whether a GPU of ``compute_capability`` ("9.0") is among ``targets``."""
    for target in targets.split(","):
        if target.endswith("+"):
            if _as_tuple(compute_capability) >= _as_tuple(target[:-1]):
                return True
        elif target == compute_capability:
            return True
    return False


def check_targets(targets: str, compute_capability: str, gpu_name: str) -> None:
    """Before deserialising: say why an RTX engine cannot run on this GPU."""
    if runs_on(targets, compute_capability):
        return
    shown = ", ".join(t.replace("+", " and later") for t in targets.split(","))
    raise EngineMismatchError(
        f"this engine targets compute capability {shown}; this GPU is {compute_capability} "
        f"({gpu_name}): TensorRT-RTX does not run there; use --backend tensorrt, or rebuild "
        "for it with --targets if TensorRT-RTX supports it"
    )


def _as_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


class RuntimeCacheFile:
    """TensorRT-RTX's runtime cache (the kernels it compiled on this GPU) kept in a file.
    A cache that cannot be read is a warning and a fresh cache, never a failure; writes are
    atomic, so a crash leaves the old cache or the new one."""

    def __init__(self, path: Path, cache: Any) -> None:
        self.path, self.cache = path, cache
        self.unwritable = False
        if path.is_file():
            try:
                blob = path.read_bytes()
                loaded = bool(blob) and bool(cache.deserialize(blob))
            except Exception as exc:  # TensorRT raises its own untyped errors for bad blobs
                logger.debug("runtime cache %s: %s", path, exc)
                loaded = False
            if not loaded:
                logger.warning("runtime cache %s is unreadable: starting a fresh one", path)
                cache.reset()

    def save(self) -> None:
        """Write the cache; where the folder cannot be written (engines shipped read-only)
        a warning, once, and the kernels are compiled again by the next process."""
        data = self.cache.serialize()
        if data is None or self.unwritable:
            return
        try:
            with atomic_path(self.path) as tmp:
                tmp.write_bytes(bytes(data))
        except OSError as exc:
            self.unwritable = True
            logger.warning(
                "runtime cache %s cannot be written (%s): the next process compiles these "
                "kernels again",
                self.path,
                exc.strerror or exc,
            )
