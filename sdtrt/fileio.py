"""Outputs, safely: every output path is checked before the work that fills it, a file or
folder appears complete or not at all, and a folder is only ever replaced when it is one
of ours (or empty)."""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sdtrt.errors import InvalidInputError

logger = logging.getLogger(__name__)

# What PIL writes by extension; an output name must say which.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
# How sdtrt writes the lossy ones, files and server answers alike: at a quality that keeps
# SD's detail (Pillow's default JPEG quality, 75, blurs it; a photo-like 512x512 takes
# 74 KiB at 95 and 33 KiB as WebP at 90, against 334 KiB as PNG).
ENCODER_SETTINGS: dict[str, dict[str, Any]] = {
    "PNG": {},
    "JPEG": {"quality": 95},
    "WEBP": {"quality": 90},
}


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def check_writable(path: Path, what: str, hint: str = "") -> None:
    """``path``'s folder exists or can be made, and a file can be created there. Probed by
    creating (and removing) a file: permission bits do not tell for root or read-only
    mounts."""
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise InvalidInputError(f"{what} {path} is under {existing}, which is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sdtrt-probe.", dir=existing)
    except OSError as exc:
        raise InvalidInputError(
            f"{what} {path} cannot be written: {existing} is not writable ({exc.strerror}){hint}"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """Refuse, before any work, an output file that could not be written."""
    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"{what} {path} is a folder: give a file name")
    check_writable(path, what)
    return path


def image_format(path: str | Path) -> str:
    """The format an image output's extension names (PNG, JPEG, WebP), else a clear error."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise InvalidInputError(
            f"output image {path}: extension {suffix or '(none)'!r} is not one sdtrt writes; "
            f"use one of {', '.join(IMAGE_FORMATS)}"
        )
    return IMAGE_FORMATS[suffix]


def check_output_dir(
    path: str | Path, is_ours: Callable[[Path], bool], what: str, hint: str = ""
) -> Path:
    """Refuse, before any work, an output folder that sdtrt would have to delete to replace
    and that is neither empty nor one of ours (``is_ours``), the current folder or one
    above it, or one that cannot be written."""
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise InvalidInputError(f"{what} {path} is a file, not a folder")
    if Path.cwd().resolve().is_relative_to(path.resolve()):
        raise InvalidInputError(
            f"{what} {path} is the current folder or one above it: name a new folder"
        )
    if path.is_dir() and any(path.iterdir()) and not is_ours(path):
        raise InvalidInputError(
            f"{what} {path} already exists and holds files sdtrt did not write: it is "
            f"replaced only when empty or one of sdtrt's own; choose another folder{hint}"
        )
    check_writable(path, what)
    return path


def _leftovers(path: Path, suffix: str) -> tuple[list[Path], float]:
    """The temporary files or folders (``suffix``) that writers of ``path`` killed outright
    (SIGKILL, the OOM killer, a power cut: no cleanup ran) left beside it, and their size
    in MB: an SD export's is gigabytes."""
    leftovers = sorted(path.parent.glob(f".{glob.escape(path.name)}.*{suffix}"))
    size = sum(
        f.stat().st_size
        for p in leftovers
        for f in ([p] if p.is_file() else p.rglob("*"))
        if f.is_file()
    )
    return leftovers, size / 1e6


def _note_leftovers(path: Path, suffix: str) -> None:
    """Say where killed writers of ``path`` left their temporary files. Not deleted: another
    process may be writing one now."""
    leftovers, size = _leftovers(path, suffix)
    if not leftovers:
        return
    logger.warning(
        "%s: left by an interrupted write of %s (%.1f MB); delete %s unless another sdtrt "
        "process is writing it now",
        ", ".join(p.name for p in leftovers),
        path,
        size,
        "it" if len(leftovers) == 1 else "them",
    )


def remove_leftovers(path: Path, suffix: str) -> None:
    """Delete what killed writers of ``path`` left. Only under the lock that every writer
    of ``path`` holds (the caches'): then no live process is writing any of it."""
    leftovers, size = _leftovers(path, suffix)
    for leftover in leftovers:
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    if leftovers:
        logger.warning(
            "removed %s (%.1f MB), left by a write of %s that was killed",
            ", ".join(p.name for p in leftovers),
            size,
            path,
        )


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _note_leftovers(path, ".tmp")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make shared caches unreadable
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | Path, is_ours: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it becomes ``path`` only on success, so an
    interrupted writer never leaves a folder that looks complete. An existing ``path`` is
    replaced only if it is empty or ``is_ours`` says so (checked before and after)."""
    path = check_output_dir(path, is_ours, "output folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    _note_leftovers(path, ".partial")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if path.exists():
            check_output_dir(path, is_ours, "output folder")  # it may have changed meanwhile
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextmanager
def exclusive_lock(path: str | Path, holder: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (made if missing): of several processes
    or threads doing the same work into a shared cache, one does it and the others wait,
    then find it done. The wait is logged, naming ``holder`` (what the lock's holder is
    doing). The kernel drops the lock when its holder exits, however it exits."""
    import fcntl  # POSIX: imported where a cache is written, not by every importer

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:  # "a": the lock file is never truncated or replaced
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another sdtrt process, %s (lock %s)", holder, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json(path: str | Path, data: Any) -> None:
    """Strict JSON (RFC 8259 has no NaN or Infinity): non-finite floats are written as
    null, so every parser reads the file."""
    with atomic_path(path) as tmp:
        text = json.dumps(_finite(data), indent=2, sort_keys=True, allow_nan=False)
        tmp.write_text(text + "\n")


def _finite(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data
