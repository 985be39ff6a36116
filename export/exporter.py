"""``sdtrt export``: a model's four networks as ONNX graphs in the Hugging Face ONNX layout
(the one optimum writes), with tokenizer, scheduler config and a manifest, so the folder
runs without PyTorch weights."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sdtrt.export.folder import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    describe_graph,
    graph_file,
    is_export,
)
from sdtrt.export.networks import VAE_NETWORKS, ModelDims, networks_for
from sdtrt.export.onnx_export import export_network
from sdtrt.fileio import atomic_dir, write_json
from sdtrt.options import ExportOptions
from sdtrt.source import ModelSource, as_source

logger = logging.getLogger(__name__)


def export_model(
    components: dict[str, Any],
    out_dir: str | Path,
    *,
    source: str | ModelSource,
    options: ExportOptions = ExportOptions(),
    show_progress: bool = True,
    fingerprint: str | None = None,
) -> Path:
    """Export into ``out_dir`` atomically: it appears complete or not at all. An existing
    ``out_dir`` is replaced only if it is empty or an earlier export (else InvalidInputError,
    before any work). ``fingerprint``: the components', where the caller has it already
    (2.6 s of hashing for SD 1.5)."""
    from sdtrt import __version__
    from sdtrt.models import model_fingerprint

    out_dir = Path(out_dir)
    opset = options.opset
    dims = ModelDims.from_components(components)
    networks = networks_for(dims)
    plan = graph_plan(tuple(networks), options.precisions, options.vae_precision)
    todo = sorted(
        {(e["file"], name, e["precision"]) for p in plan.values() for name, e in p.items()}
    )

    with atomic_dir(out_dir, is_export) as tmp:
        graphs: dict[str, dict[str, Any]] = {}
        timings: dict[str, float] = {}
        for file, name, precision in tqdm(todo, desc="export", disable=not show_progress):
            network = networks[name]
            start = time.perf_counter()
            export_network(
                network, components[network.component], tmp / file, precision=precision, opset=opset
            )
            timings[file] = round(time.perf_counter() - start, 2)
            logger.info("exported %s in %.1f s", file, timings[file])
            graphs[file] = describe_graph(tmp, file)
        write_tokenizer(tmp / "tokenizer", components["tokenizer"])
        _write_component_configs(tmp, components)
        _write_scheduler_config(tmp, components["scheduler"])
        _write_model_index(tmp, components)
        vae_config = components["vae"].config
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "sdtrt_version": __version__,
            "source": {
                **asdict(as_source(source)),
                "fingerprint": fingerprint or model_fingerprint(components),
            },
            "opset": opset,
            "precisions": plan,
            "graphs": graphs,
            "networks": {
                name: {"inputs": net.inputs, "outputs": net.outputs}
                for name, net in networks.items()
            },
            "dynamic_axes": {
                "B": "images per request",
                "2B": "UNet batch: [uncond, cond] for each image",
                "H, W": f"image height, width in pixels: multiples of {dims.size_multiple}",
                "h, w": f"latent height, width: H, W / {dims.vae_scale_factor}",
            },
            "dims": asdict(dims),
            "size_multiple": dims.size_multiple,
            "size_rule": (
                f"height and width must be multiples of {dims.vae_scale_factor} x "
                f"2^{dims.unet_factor.bit_length() - 1} = {dims.size_multiple} px"
            ),
            "vae_scale_factor": dims.vae_scale_factor,
            "scaling_factor": vae_config.scaling_factor,
            "versions": _versions(),
            "export_seconds": timings,
        }
        write_json(tmp / MANIFEST, manifest)
    return out_dir


def graph_plan(
    networks: tuple[str, ...], precisions: tuple[str, ...], vae_precision: str | None
) -> dict[str, dict[str, dict[str, str]]]:
    """Which graph file each (precision, network) uses; with ``vae_precision`` the VAE's
    graphs are that precision's whatever the rest is (fp32 for VAEs that overflow in fp16)."""
    plan: dict[str, dict[str, dict[str, str]]] = {}
    for precision in precisions:
        plan[precision] = {}
        for name in networks:
            used = vae_precision if (name in VAE_NETWORKS and vae_precision) else precision
            plan[precision][name] = {"file": graph_file(name, used), "precision": used}
    return plan


def _write_scheduler_config(root: Path, scheduler: Any) -> None:
    """The scheduler config with its ``_use_default_values`` kept. diffusers' save_pretrained
    writes defaults out as if chosen, and then another scheduler class built from the saved
    config takes them (LMS would get PNDM's "leading" spacing instead of its own
    "linspace"): the exported folder would not run what the PyTorch model runs."""
    config = {"_class_name": type(scheduler).__name__, **dict(scheduler.config)}
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n"
    )


def write_tokenizer(folder: Path, tokenizer: Any) -> None:
    """The tokenizer in both formats the layout's readers use: transformers 5 writes only
    the fast ``tokenizer.json``; transformers 4's CLIPTokenizer (optimum's, and every SD
    repository's) needs ``vocab.json``, ``merges.txt`` and ``special_tokens_map.json``,
    written here from the same BPE model."""
    tokenizer.save_pretrained(folder)
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False) + "\n")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _write_component_configs(root: Path, components: dict[str, Any]) -> None:
    """Each network folder's ``config.json``, as optimum reads them: without the VAE's
    ``scaling_factor`` it silently falls back to 2^(blocks-1) and paints wrong pictures."""
    components["text_encoder"].config.to_json_file(root / "text_encoder" / "config.json")
    components["unet"].save_config(root / "unet")
    for half in ("vae_encoder", "vae_decoder"):
        components["vae"].save_config(root / half)


def _write_model_index(root: Path, components: dict[str, Any]) -> None:
    # Optimum's layout: the class names say which ONNX model each folder holds.
    index = {
        "_class_name": "ORTStableDiffusionImg2ImgPipeline",
        "tokenizer": ["transformers", type(components["tokenizer"]).__name__],
        "scheduler": ["diffusers", type(components["scheduler"]).__name__],
        "text_encoder": ["onnxruntime", "ORTModelTextEncoder"],
        "unet": ["onnxruntime", "ORTModelUnet"],
        "vae_encoder": ["onnxruntime", "ORTModelVaeEncoder"],
        "vae_decoder": ["onnxruntime", "ORTModelVaeDecoder"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _versions() -> dict[str, str]:
    import diffusers
    import onnx
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
    }
