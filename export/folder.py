"""An exported folder, opened and checked: the manifest is read, the graphs a precision
needs are found and their sha256 compared with the manifest before anything runs them."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sdtrt.errors import GraphIntegrityError, InvalidInputError, ModelNotFoundError
from sdtrt.export.networks import GraphIO, ModelDims, Network, load_graph, networks_for
from sdtrt.source import ModelSource, as_source

logger = logging.getLogger(__name__)

MANIFEST = "sdtrt.json"
FORMAT = "sdtrt-onnx"
# 2: the UNet takes one timestep per row ([2B], was [1]); each graph's I/O in the manifest.
FORMAT_VERSION = 2
GRAPH_FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx"}
# What the code reads of a manifest, and its JSON kind.
_MANIFEST_KEYS: dict[str, type | tuple[type, ...]] = {
    "source": dict,
    "precisions": dict,
    "graphs": dict,
    "dims": dict,
    "scaling_factor": (int, float),
}


def graph_file(network: str, precision: str) -> str:
    return f"{network}/{GRAPH_FILES[precision]}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_graph(root: Path, file: str) -> dict[str, Any]:
    """A graph's manifest entry: the sha256 of its file and of every external-data file it
    names (``model.onnx.data`` from sdtrt, ``model.onnx_data`` from optimum), and its I/O."""
    import onnx

    path = root / file
    model = load_graph(path)
    graph = model.graph
    locations = {
        entry.value
        for tensor in graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    files = [path] + [path.with_name(name) for name in sorted(locations)]
    for data in files[1:]:
        if not data.is_file():
            raise GraphIntegrityError(f"{path} keeps its weights in {data}, which is missing")
    return {
        "sha256": {f.name: sha256_file(f) for f in files},
        "bytes": sum(f.stat().st_size for f in files),
        "io": GraphIO.of(graph).to_json(),
        "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
    }


def is_onnx_folder(path: str | Path) -> bool:
    """An sdtrt export, or a folder in the Hugging Face ONNX layout another tool wrote
    (optimum: ``unet/model.onnx`` beside ``model_index.json``) that sdtrt can adopt."""
    root = Path(path)
    if (root / MANIFEST).is_file():  # ours, or damaged: ExportedModel.open says which
        return True
    return (root / "model_index.json").is_file() and (root / "unet" / GRAPH_FILES["fp32"]).is_file()


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a folder ``sdtrt export`` wrote (its manifest says so)."""
    manifest = Path(path, MANIFEST)
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class ExportedModel:
    root: Path
    manifest: dict[str, Any]
    fix: str = "export again"
    """What a user does about a damaged folder: theirs, export again; the cache's, clear it."""
    _verified: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, root: str | Path, fix: str = "export again") -> ExportedModel:
        root = Path(root)
        if not root.is_dir():
            raise ModelNotFoundError(f"exported model folder {root} does not exist")
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            if not is_onnx_folder(root):
                raise ModelNotFoundError(
                    f"{root} has no {MANIFEST} and no model_index.json with unet/model.onnx: "
                    "neither a folder written by `sdtrt export` nor one in the Hugging Face "
                    "ONNX layout (optimum-cli export onnx)"
                )
            from sdtrt.export.adopt import foreign_manifest

            logger.info("%s has no %s: reading its graphs (sdtrt adopt stores it)", root, MANIFEST)
            manifest = foreign_manifest(root)
            model = cls(root, manifest, fix="export it again")
            model._verified.update(manifest["graphs"])  # hashed just now
            return model
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise GraphIntegrityError(f"{manifest_path} is not valid JSON: {exc}; {fix}") from exc
        if not isinstance(manifest, dict):
            raise GraphIntegrityError(f"{manifest_path} is not a JSON object: {fix}")
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            source = (manifest.get("source") or {}).get("model") or "MODEL"
            raise GraphIntegrityError(
                f"{manifest_path} is format {manifest.get('format')!r} version "
                f"{manifest.get('format_version')!r}; this sdtrt reads {FORMAT} version "
                f"{FORMAT_VERSION} (one timestep per UNet row): export the model again with "
                f"`sdtrt export --model {source} --out {root}`"
            )
        damaged = [k for k, kind in _MANIFEST_KEYS.items() if not isinstance(manifest.get(k), kind)]
        if not damaged:
            try:
                ModelDims(**manifest["dims"])
            except TypeError:
                damaged.append("dims")
        if damaged:
            raise GraphIntegrityError(
                f"{manifest_path} is damaged: {', '.join(damaged)} missing or malformed; {fix}"
            )
        from sdtrt.models import has_tokenizer

        if not has_tokenizer(root / "tokenizer"):
            raise GraphIntegrityError(f"{root} is missing its tokenizer/ files")
        if not (root / "scheduler" / "scheduler_config.json").is_file():
            raise GraphIntegrityError(f"{root} is missing scheduler/scheduler_config.json")
        return cls(root, manifest, fix)

    @property
    def dims(self) -> ModelDims:
        return ModelDims(**self.manifest["dims"])

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(self.manifest["precisions"])

    @property
    def adopted(self) -> bool:
        """Written by another tool (optimum): no PyTorch source is recorded."""
        return self.manifest["source"].get("fingerprint") is None

    def network(self, network: str, precision: str) -> Network:
        """The contract of the graph ``network`` runs at ``precision``: sdtrt's, adapted to
        what that graph takes and gives (as read at export or adoption)."""
        file = self._entry(network, precision)["file"]
        io = GraphIO.from_json(self.manifest["graphs"][file]["io"])
        contract = networks_for(self.dims, {network: io})[network]
        contract.check_io(str(self.root / file))
        return contract

    def graph_path(self, network: str, precision: str) -> Path:
        """The graph file ``network`` uses at ``precision``, checked against the manifest."""
        entry = self._entry(network, precision)
        path = self.root / entry["file"]
        if entry["file"] not in self._verified:
            self._verify(entry["file"])
            self._verified.add(entry["file"])
        return path

    def network_precision(self, network: str, precision: str) -> str:
        """The precision of the graph ``network`` runs at ``precision`` (a VAE kept in fp32
        runs fp32 in an fp16 export)."""
        return str(self._entry(network, precision)["precision"])

    def graph_sha256(self, network: str, precision: str) -> str:
        file = self._entry(network, precision)["file"]
        return str(self.manifest["graphs"][file]["sha256"][Path(file).name])

    @property
    def vae_scale_factor(self) -> int:
        return self.dims.vae_scale_factor

    @property
    def scaling_factor(self) -> float:
        return float(self.manifest["scaling_factor"])

    @property
    def source_model(self) -> str:
        return str(self.manifest["source"]["model"])

    @property
    def clip_skip(self) -> int | None:
        """The clip skip its text encoder was exported with (None: every layer)."""
        return self.manifest["source"].get("clip_skip")

    @classmethod
    def open_as(cls, source: ModelSource) -> ExportedModel:
        """A folder named as the model to run: its graphs run as they are, so the options
        that choose PyTorch weights are refused (they were chosen at export), and a clip
        skip asked for must be the one its text encoder was exported with."""
        weights = {
            "--variant": source.variant,
            "--config": source.config,
            "--allow-pickle": source.allow_pickle,
            "--vae": source.vae,
            "--lora": source.loras,
            "--embedding": source.embeddings,
        }
        chosen = [flag for flag, value in weights.items() if value]
        if chosen:
            them = "them" if len(chosen) > 1 else "it"
            raise InvalidInputError(
                f"{' and '.join(chosen)}: for the PyTorch weights a model is loaded from; "
                f"{source.model} is an ONNX export, whose weights were chosen when it was "
                f"exported: leave {them} out, or export again with {them}"
            )
        exported = cls.open(source.model)
        if source.clip_skip is not None and source.clip_skip != (exported.clip_skip or 0):
            if exported.adopted:
                had = "was written by another tool, which records no clip skip"
            elif exported.clip_skip:
                had = f"was exported with clip skip {exported.clip_skip}"
            else:
                had = "was exported without clip skip"
            raise InvalidInputError(
                f"{source.model} {had}, and a graph's layers cannot be skipped at run "
                "time: leave --clip-skip out to run it as it is, or export the model with "
                f"`sdtrt export --clip-skip {source.clip_skip}`"
            )
        return exported

    def _entry(self, network: str, precision: str) -> dict[str, str]:
        if precision not in self.manifest["precisions"]:
            raise InvalidInputError(
                f"{self.root} holds {', '.join(self.precisions)} graphs, not {precision}: "
                f"export with --precision {precision}"
            )
        entry: dict[str, str] = self.manifest["precisions"][precision][network]
        return entry

    def _verify(self, file: str) -> None:
        described = self.manifest["graphs"].get(file)
        if described is None:
            raise GraphIntegrityError(f"{self.root / file} is not described in the manifest")
        for name, expected in described["sha256"].items():
            path = self.root / Path(file).parent / name
            if not path.is_file():
                raise GraphIntegrityError(f"graph file {path} is missing: {self.fix}")
            if sha256_file(path) != expected:
                raise GraphIntegrityError(
                    f"graph file {path} does not match its manifest (sha256 differs): it was "
                    f"changed, truncated or corrupted after export; {self.fix}"
                )

    def source_components(self, reference: str | ModelSource | None = None) -> dict[str, Any]:
        """The PyTorch components this folder was exported from, loaded again and checked to
        be the same weights and config: the reference that check and bench compare with.
        ``reference`` names them where the folder does not (one adopted from optimum); its
        numbers are then what check compares, there is no fingerprint to hold them to."""
        from sdtrt.models import load_components, model_fingerprint

        source = self.manifest["source"]
        if reference is None and self.adopted:
            raise ModelNotFoundError(
                f"{self.root} was not exported by sdtrt and records no PyTorch model to "
                "compare with: name it with --reference (a built-in name or diffusers folder)"
            )
        given = reference is not None
        if reference is None:
            # The manifest's source is the ModelSource the export had (asdict), with its
            # fingerprint; older manifests lack the later fields, which keep their defaults.
            recorded = {f.name for f in fields(ModelSource)}
            reference = ModelSource(**{k: v for k, v in source.items() if k in recorded})
        components = load_components(reference)
        # A folder that records its model is held to it, a reference too: compared with
        # another model every network "fails" by a mile, which says nothing of the export.
        if self.adopted or model_fingerprint(components) == source["fingerprint"]:
            return components
        if given:
            raise InvalidInputError(
                f"the reference {as_source(reference).describe()} is not the model "
                f"{self.root} was exported from ({source['model']}; weights or config "
                "differ): give that model, or no reference (the folder records it)"
            )
        raise GraphIntegrityError(
            f"{self.root} was exported from another model than {source['model']} is now "
            "(weights or config differ): export again"
        )

    def tokenizer(self) -> Any:
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(self.root / "tokenizer", local_files_only=True)

    def scheduler_config(self) -> dict[str, Any]:
        return json.loads((self.root / "scheduler" / "scheduler_config.json").read_text())
