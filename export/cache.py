"""Exports made once per (model, precision, opset) into a cache folder and reused."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from sdtrt.export.folder import FORMAT_VERSION, ExportedModel, is_export
from sdtrt.fileio import check_writable, exclusive_lock, remove_leftovers
from sdtrt.options import CacheOptions, ExportOptions
from sdtrt.source import as_source

logger = logging.getLogger(__name__)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$SDTRT_CACHE``, else ``$XDG_CACHE_HOME/sdtrt``, else
    ``~/.cache/sdtrt``: where Hugging Face's and torch's caches go, sdtrt's goes too."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("SDTRT_CACHE"):
        return Path(os.environ["SDTRT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "sdtrt"


def exported_for(
    components: dict[str, Any], *, precision: str, cache: CacheOptions = CacheOptions()
) -> ExportedModel:
    """The model's graphs at ``precision``, exported into the cache the first time."""
    from sdtrt.export.exporter import export_model
    from sdtrt.models import model_fingerprint

    fingerprint = model_fingerprint(components)
    key = f"{fingerprint[:24]}-{precision}-opset{cache.opset}-v{FORMAT_VERSION}"
    folder = cache_root(cache.cache_dir) / "onnx" / key
    fix = (
        f"{folder} is sdtrt's export cache: delete it (or all of {folder.parent}) and run "
        "again to export afresh"
    )
    if is_export(folder):  # reuse writes nothing: a cache may be read-only (baked in an image)
        logger.info("reusing the export in %s", folder)
        return ExportedModel.open(folder, fix=fix)
    check_writable(
        folder,
        "the export cache entry",
        " ($SDTRT_CACHE names the cache folder; default $XDG_CACHE_HOME/sdtrt or ~/.cache/sdtrt)",
    )
    # Processes sharing the cache (Ray Serve replicas starting together, parallel jobs)
    # export a model once: the others wait for the lock, then reuse the folder. Without it
    # each exported the whole model again and the last one replaced the folder the others
    # were reading.
    with exclusive_lock(folder.with_name(f"{key}.lock"), f"exporting into {folder}"):
        if is_export(folder):  # exported while this process waited
            logger.info("reusing the export in %s", folder)
        else:
            if folder.exists():  # an entry that never completed: only ours, by its key
                logger.warning("removing the incomplete cache entry %s", folder)
                shutil.rmtree(folder)
            remove_leftovers(folder, ".partial")  # an export killed (OOM) left gigabytes
            logger.info(
                "exporting %s (%s, opset %d) into %s",
                as_source(cache.source).describe(),
                precision,
                cache.opset,
                folder,
            )
            options = ExportOptions(precisions=(precision,), opset=cache.opset)
            export_model(
                components, folder, source=cache.source, options=options, fingerprint=fingerprint
            )
    return ExportedModel.open(folder, fix=fix)
