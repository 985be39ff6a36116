"""Folders in the Hugging Face ONNX layout that another tool wrote (``optimum-cli export
onnx``): their manifest computed from what is there (graph hashes and I/O, sizes from the
graphs and component configs), so sdtrt runs, checks, benches and builds them as its own.
``sdtrt adopt DIR`` stores the manifest beside the folder's files; nothing else is written.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sdtrt.errors import GraphIntegrityError
from sdtrt.export.folder import (
    FORMAT,
    FORMAT_VERSION,
    GRAPH_FILES,
    MANIFEST,
    ExportedModel,
    describe_graph,
)
from sdtrt.export.networks import (
    NETWORK_NAMES,
    GraphIO,
    ModelDims,
    check_unet_config,
    is_tiny_vae,
    networks_for,
)
from sdtrt.fileio import write_json
from sdtrt.source import ModelSource

_PRECISION = {"float32": "fp32", "float16": "fp16"}


def foreign_manifest(root: Path) -> dict[str, Any]:
    """The manifest ``sdtrt export`` would have written for the graphs in ``root``. What is
    missing or unreadable is named (GraphIntegrityError), before anything runs."""
    missing = [
        part
        for part in (
            *(f"{n}/{GRAPH_FILES['fp32']}" for n in NETWORK_NAMES),
            "tokenizer/",
            "scheduler/scheduler_config.json",
            "unet/config.json",
            "vae_decoder/config.json",
        )
        if not (root / part.rstrip("/")).exists()
    ]
    if missing:
        raise GraphIntegrityError(
            f"{root} is incomplete for the Hugging Face ONNX layout: missing "
            f"{', '.join(missing)} (optimum-cli export onnx --task image-to-image writes "
            "them all)"
        )
    unet_config, vae_config = _config(root / "unet"), _config(root / "vae_decoder")
    graphs = {f"{n}/model.onnx": describe_graph(root, f"{n}/model.onnx") for n in NETWORK_NAMES}
    io = {n: GraphIO.from_json(graphs[f"{n}/model.onnx"]["io"]) for n in NETWORK_NAMES}
    try:
        dims = ModelDims(
            text_hidden_size=int(io["text_encoder"].outputs["last_hidden_state"][1][-1]),
            latent_channels=int(io["unet"].inputs["sample"][1][1]),
            vae_scale_factor=2 ** (len(vae_config["block_out_channels"]) - 1),
            unet_factor=2 ** (len(unet_config["down_block_types"]) - 1),
            vae_samples=not is_tiny_vae(vae_config),
        )
        scaling_factor = float(vae_config["scaling_factor"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise GraphIntegrityError(
            f"{root}: cannot read the model's sizes ({exc!r} missing or not a number in the "
            "graphs' I/O or unet/vae_decoder config.json)"
        ) from exc
    check_unet_config(
        unet_config,
        int(vae_config.get("latent_channels", dims.latent_channels)),
        dims.text_hidden_size,
        str(root),
    )
    for name, network in networks_for(dims, io).items():
        network.check_io(str(root / name / "model.onnx"))
    precisions = {
        name: _PRECISION.get(io[name].outputs[network.output_name][0], "fp32")
        for name, network in networks_for(dims, io).items()
    }
    unet_precision = precisions["unet"]
    plan = {
        unet_precision: {
            name: {"file": f"{name}/model.onnx", "precision": precisions[name]}
            for name in NETWORK_NAMES
        }
    }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adopted": f"computed by sdtrt from a folder it did not write ({root})",
        "source": {**asdict(ModelSource(str(root))), "fingerprint": None},
        "opset": graphs["unet/model.onnx"]["opset"],
        "precisions": plan,
        "graphs": graphs,
        "dims": asdict(dims),
        "size_multiple": dims.size_multiple,
        "vae_scale_factor": dims.vae_scale_factor,
        "scaling_factor": scaling_factor,
    }


def adopt(root: str | Path) -> ExportedModel:
    """``sdtrt adopt``: store the computed manifest in ``root`` (atomically), so later opens
    skip hashing and check the graphs against it, as for an export of sdtrt's."""
    root = Path(root)
    if (root / MANIFEST).exists():
        return ExportedModel.open(root)
    model = ExportedModel.open(root)  # computes it, or names what is missing
    write_json(root / MANIFEST, model.manifest)
    return ExportedModel.open(root)


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GraphIntegrityError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise GraphIntegrityError(f"{path} is not a JSON object")
    return config
