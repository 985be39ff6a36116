"""Exports made once per (model, precision, opset) into a cache folder and reused."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from sdtrt.export.folder import ExportedModel
from sdtrt.export.onnx_export import DEFAULT_OPSET

logger = logging.getLogger(__name__)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$SDTRT_CACHE``, else ``~/.cache/sdtrt``."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("SDTRT_CACHE", "~/.cache/sdtrt")).expanduser()


def exported_for(
    components: dict[str, Any],
    *,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    cache_dir: str | Path | None = None,
    source: str = "in-memory",
) -> ExportedModel:
    from sdtrt.export.exporter import export_model
    from sdtrt.models import model_fingerprint

    key = f"{model_fingerprint(components)[:24]}-{precision}-opset{opset}"
    folder = cache_root(cache_dir) / "onnx" / key
    if (folder / "sdtrt.json").is_file():
        logger.info("reusing the export in %s", folder)
    else:
        logger.info("exporting %s (%s, opset %d) into %s", source, precision, opset, folder)
        export_model(components, folder, source=source, precisions=(precision,), opset=opset)
    return ExportedModel.open(folder)
