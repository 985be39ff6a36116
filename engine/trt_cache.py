"""Engine cache keys, sidecars, the build lock and the atomic write.

An engine only runs on the TensorRT version and GPU generation it was built for, so each
engine file's name and its JSON sidecar carry everything it was built from. A mismatch is
found from the sidecar, before the engine is deserialised. Pure Python: tested on CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdtrt.errors import EngineMismatchError
from sdtrt.export.folder import sha256_file
from sdtrt.fileio import (
    atomic_path,
    check_writable,
    exclusive_lock,
    remove_leftovers,
    write_json,
)

logger = logging.getLogger(__name__)

# What must match for an engine to run here at all; the profile and build flags only decide
# whether `sdtrt build` rebuilds. A standard engine runs on the GPU model it was built on; an
# RTX engine on any GPU among its targets (checked by trt_family.check_targets).
RUNTIME_FIELDS = (
    "network",
    "graph_sha256",
    "precision",
    "family",
    "tensorrt_version",
    "gpu_name",
    "compute_capability",
)
RTX_RUNTIME_FIELDS = tuple(f for f in RUNTIME_FIELDS if f not in ("gpu_name", "compute_capability"))
_FAMILY_TAGS = {"tensorrt": "trt", "tensorrt-rtx": "rtx"}


@dataclass(frozen=True)
class EngineKey:
    network: str
    graph_sha256: str
    precision: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    """Standard TensorRT: the GPU's ("9.0"). TensorRT-RTX: the targets ("8.0,8.6,8.9,12.0+")."""
    family: str = "tensorrt"
    profile: dict[str, Any] = field(default_factory=dict)
    build_flags: dict[str, Any] = field(default_factory=dict)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def stem(self) -> str:
        cc = self.compute_capability.replace(".", "").replace(",", "-").replace("+", "p")
        tag = _FAMILY_TAGS.get(self.family, self.family)
        return (
            f"{self.network}.{self.precision}.{tag}{self.tensorrt_version}.sm{cc}.{self.digest()}"
        )

    def runtime_fields(self) -> tuple[str, ...]:
        return RTX_RUNTIME_FIELDS if self.family == "tensorrt-rtx" else RUNTIME_FIELDS

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def mismatches(found: dict[str, Any], expected: EngineKey, fields: tuple[str, ...]) -> list[str]:
    """Each differing field as 'field: engine has X, needed Y'."""
    want = expected.to_json()
    return [
        f"{name}: engine has {found.get(name)!r}, needed {want[name]!r}"
        for name in fields
        if found.get(name) != want[name]
    ]


def find_engine(
    engine_dir: Path, expected: EngineKey, gpu: tuple[str, str] | None = None
) -> tuple[Path, dict[str, Any]]:
    """The newest engine for ``expected.network`` whose sidecar matches this machine and
    graph; else EngineMismatchError naming what differs (or that none was built). For an
    RTX engine, ``gpu`` (name, compute capability) is checked against its targets."""
    from sdtrt.engine.trt_family import check_targets

    sidecars = sorted(
        engine_dir.glob(f"{expected.network}.*.json"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    problems: list[str] = []
    for sidecar in sidecars:
        found = _read_sidecar(sidecar)
        if found is None:
            problems.append(f"{sidecar.name}: unreadable sidecar")
            continue
        differ = mismatches(found, expected, expected.runtime_fields())
        plan = sidecar.with_suffix(".plan")
        if not differ and plan.is_file() and plan.stat().st_size != found.get("plan_bytes"):
            differ = [f"engine file {plan.name} is not the size its sidecar records: rebuild it"]
        if not differ and plan.is_file():
            if gpu is not None and expected.family == "tensorrt-rtx":
                check_targets(found["compute_capability"], gpu[1], gpu[0])
            return plan, found
        problems.extend(f"{sidecar.name}: {d}" for d in differ or ["engine file missing"])
    if not sidecars:
        raise EngineMismatchError(
            f"no {expected.network} engine in {engine_dir}: run `sdtrt build` first"
        )
    raise EngineMismatchError(
        f"no {expected.network} engine in {engine_dir} fits this machine and graph ("
        + "; ".join(problems)
        + "): rebuild with `sdtrt build`"
    )


def has_engine(engine_dir: Path, network: str, precision: str, family: str = "tensorrt") -> bool:
    """Whether any ``family`` engine of ``network`` at ``precision`` is in ``engine_dir``."""
    return any(engine_dir.glob(f"{network}.{precision}.{_FAMILY_TAGS[family]}*.json"))


def _read_sidecar(sidecar: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return found if isinstance(found, dict) else None


def _matches(plan: Path, sidecar: Path, key: EngineKey, *, say_why: bool = False) -> bool:
    """Whether ``plan`` is the engine for ``key``: its sidecar matches every field and
    vouches for its bytes. ``say_why``: log why a present engine is not reused."""
    found = _read_sidecar(sidecar) if plan.is_file() else None
    if found is not None and not mismatches(found, key, tuple(key.to_json())):
        if sha256_file(plan) == found.get("plan_sha256"):
            return True
        if say_why:
            logger.warning("engine %s does not match its sidecar: building it again", plan.name)
    elif say_why and sidecar.is_file() and found is None:
        logger.warning("sidecar %s is unreadable: building the engine again", sidecar.name)
    return False


def cached_engine(engine_dir: Path, key: EngineKey, build: Callable[[], bytes]) -> Path:
    """The engine for ``key``: reused when its sidecar matches every field, else built with
    ``build`` under a lock and written atomically (engine first, then the sidecar that
    vouches for it)."""
    plan = engine_dir / f"{key.stem()}.plan"
    sidecar = plan.with_suffix(".json")
    if _matches(plan, sidecar, key):  # reuse writes nothing: the folder may be read-only
        logger.info("reusing engine %s", plan.name)
        return plan
    check_writable(plan, "the engine")  # a typed error before the lock's own write
    with exclusive_lock(plan.with_suffix(".lock"), f"building {plan.name}"):
        if _matches(plan, sidecar, key, say_why=True):  # built while this process waited
            logger.info("reusing engine %s", plan.name)
            return plan
        for path in (plan, sidecar):  # a build killed (OOM) while writing left them
            remove_leftovers(path, ".tmp")
        logger.info("building engine %s", plan.name)
        data = build()
        with atomic_path(plan) as tmp:
            tmp.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        write_json(sidecar, {**key.to_json(), "plan_sha256": digest, "plan_bytes": len(data)})
    return plan
