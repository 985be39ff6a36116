"""An exported folder, opened and checked: the manifest is read, the graphs a precision
needs are found and their sha256 compared with the manifest before anything runs them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtrt.errors import GraphIntegrityError, InvalidInputError, ModelNotFoundError
from sdtrt.export.exporter import FORMAT_VERSION, MANIFEST, sha256_file
from sdtrt.export.networks import NETWORK_NAMES, ModelDims


@dataclass
class ExportedModel:
    root: Path
    manifest: dict[str, Any]
    _verified: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, root: Path) -> ExportedModel:
        root = Path(root)
        if not root.is_dir():
            raise ModelNotFoundError(f"exported model folder {root} does not exist")
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise ModelNotFoundError(
                f"{root} has no {MANIFEST}: not a folder written by `sdtrt export`"
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise GraphIntegrityError(f"{manifest_path} is not valid JSON: {exc}") from exc
        if (
            manifest.get("format") != "sdtrt-onnx"
            or manifest.get("format_version") != FORMAT_VERSION
        ):
            raise GraphIntegrityError(
                f"{manifest_path} is format {manifest.get('format')!r} version "
                f"{manifest.get('format_version')!r}; this sdtrt reads sdtrt-onnx version "
                f"{FORMAT_VERSION}: export the model again"
            )
        for part in ("tokenizer", "scheduler"):
            if not (root / part).is_dir():
                raise GraphIntegrityError(f"{root} is missing its {part}/ folder")
        return cls(root, manifest)

    @property
    def dims(self) -> ModelDims:
        return ModelDims(**self.manifest["dims"])

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(self.manifest["precisions"])

    def graph_path(self, network: str, precision: str) -> Path:
        """The graph file ``network`` uses at ``precision``, checked against the manifest."""
        if precision not in self.manifest["precisions"]:
            raise InvalidInputError(
                f"{self.root} holds {', '.join(self.precisions)} graphs, not {precision}: "
                f"export with --precision {precision}"
            )
        entry = self.manifest["precisions"][precision][network]
        path = self.root / entry["file"]
        if entry["file"] not in self._verified:
            self._verify(entry["file"])
            self._verified.add(entry["file"])
        return path

    def network_precision(self, network: str, precision: str) -> str:
        return self.manifest["precisions"][precision][network]["precision"]

    def verify(self, precision: str) -> None:
        for network in NETWORK_NAMES:
            self.graph_path(network, precision)

    def _verify(self, file: str) -> None:
        described = self.manifest["graphs"].get(file)
        if described is None:
            raise GraphIntegrityError(f"{self.root / file} is not described in the manifest")
        for name, expected in described["sha256"].items():
            path = self.root / Path(file).parent / name
            if not path.is_file():
                raise GraphIntegrityError(f"graph file {path} is missing: export again")
            if sha256_file(path) != expected:
                raise GraphIntegrityError(
                    f"graph file {path} does not match its manifest (sha256 differs): it was "
                    "changed, truncated or corrupted after export; export again"
                )

    def source_components(self) -> dict[str, Any]:
        """The PyTorch components this folder was exported from, loaded again and checked to
        be the same weights and config: the reference that check and bench compare with."""
        from sdtrt.models import load_components, model_fingerprint

        source = self.manifest["source"]
        components = load_components(source["model"])
        if model_fingerprint(components) != source["fingerprint"]:
            raise GraphIntegrityError(
                f"{self.root} was exported from another model than {source['model']} is now "
                "(weights or config differ): export again"
            )
        return components

    def tokenizer(self) -> Any:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(self.root / "tokenizer", local_files_only=True)

    def scheduler_config(self) -> dict[str, Any]:
        return json.loads((self.root / "scheduler" / "scheduler_config.json").read_text())
