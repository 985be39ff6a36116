"""``sdtrt check``: does a backend compute what PyTorch computes?

Each network runs on fresh random inputs at several shapes through the backend's graph and
through the fp32 PyTorch network (polygraphy's Comparator drives both runners), then the
whole img2img image is compared with the torch backend's for the same seed.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from sdtrt.export.folder import ExportedModel
from sdtrt.export.networks import NETWORK_NAMES, Network
from sdtrt.options import TRT_FAMILIES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Thresholds:
    rel_l2: float
    """Per network: ||backend - torch|| / ||torch|| at most this."""
    max_levels: int
    """End to end: no pixel further than this many 8-bit levels from the torch image."""
    min_psnr: float
    """End to end: PSNR (dB, 8-bit) at least this."""


THRESHOLDS = {
    # fp32: the same arithmetic up to kernel order; measured ~1e-6 on every network.
    "fp32": Thresholds(rel_l2=1e-4, max_levels=1, min_psnr=50.0),
    # fp16: a 10-bit mantissa. Measured on the tiny model with ORT CPU: rel L2 6e-4..1.4e-3
    # per network (the VAE decoder worst); img2img, 8 LMS steps: PSNR 61.7 dB, 1 level.
    # Bounds leave ~4x on the networks and room for real models' larger activations.
    "fp16": Thresholds(rel_l2=5e-3, max_levels=8, min_psnr=40.0),
}


@dataclass
class NetworkResult:
    network: str
    shape: str
    max_abs: float
    rel_l2: float
    cosine: float
    passed: bool


@dataclass
class ImageResult:
    psnr: float
    max_levels: int
    passed: bool


class TorchNetworkRunner(BaseRunner):
    """A polygraphy runner for one PyTorch network on CPU, in fp32 whatever the graph's
    precision (polygraphy's stock PyTorch runner assumes CUDA)."""

    def __init__(self, network: Network, module: torch.nn.Module, input_dtypes: dict[str, Any]):
        super().__init__(name=f"torch-{network.name}", prefix="torch-runner")
        self.network, self.module, self.input_dtypes = network, module, input_dtypes

    def activate_impl(self) -> None:
        self.wrapper = self.network.wrap(self.module).eval()

    def get_input_metadata_impl(self) -> TensorMetadata:
        meta = TensorMetadata()
        for name, axes in self.network.inputs.items():
            shape = [None if isinstance(a, tuple) else a for a in axes]
            meta.add(name, dtype=self.input_dtypes[name], shape=shape)
        return meta

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> OrderedDict:
        inputs = [
            torch.from_numpy(np.asarray(a, a.dtype if a.dtype.kind == "i" else np.float32))
            for a in feed_dict.values()
        ]
        start = time.perf_counter()
        with torch.no_grad():
            out = self.wrapper(*inputs)
        self.inference_time = time.perf_counter() - start
        return OrderedDict([(self.network.output_name, out.float().numpy())])

    def deactivate_impl(self) -> None:
        del self.wrapper


def _graph_runner(
    backend: str,
    exported: ExportedModel,
    network: str,
    precision: str,
    engine_dir: str | None = None,
) -> Any:
    """polygraphy's runner for the backend's form of ``network``: the ONNX graph in ONNX
    Runtime, or the built engine in TensorRT (in ``engine_dir``, else the export's)."""
    if backend in TRT_FAMILIES:
        from sdtrt.engine.trt_family import use_polygraphy_family

        use_polygraphy_family(backend)
        from polygraphy.backend.trt import EngineFromPath, TrtRunner

        path, _ = _built_engine(exported, network, precision, backend, engine_dir)
        return TrtRunner(EngineFromPath(str(path)))
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    path = exported.graph_path(network, precision)
    return OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"]))


def _built_engine(
    exported: ExportedModel,
    network: str,
    precision: str,
    family: str,
    engine_dir: str | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The engine ``sdtrt build`` made for ``network`` (the newest that fits this machine
    and graph, whatever its ranges), and its sidecar (the profile it was built for)."""
    from sdtrt.engine.trt_build import default_engine_dir, engine_key, gpu_identity
    from sdtrt.engine.trt_cache import find_engine
    from sdtrt.options import BuildOptions

    key = engine_key(exported, network, precision, BuildOptions(), family)
    folder = Path(engine_dir) if engine_dir else default_engine_dir(exported)
    return find_engine(folder, key, gpu_identity())


def _profile_corners(
    exported: ExportedModel, precision: str, family: str, engine_dir: str | None = None
) -> list[tuple[int, int, int]]:
    """The smallest and largest requests (images, height, width) the engines were built
    for, from the VAE decoder's profile: the UNet's rows start at one per image (unguided),
    so half its smallest row count is no image count (it read 0 images for `--batch 1-4`)."""
    _, sidecar = _built_engine(exported, "vae_decoder", precision, family, engine_dir)
    f = exported.vae_scale_factor
    corners = []
    for end in ("min", "max"):
        batch, _, h, w = sidecar["profile"]["latent_sample"][end]
        corners.append((batch, h * f, w * f))
    return corners


def compare_networks(
    exported: ExportedModel,
    components: dict[str, Any],
    precision: str,
    backend: str = "onnxruntime",
    engine_dir: str | None = None,
) -> list[NetworkResult]:
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    limit = THRESHOLDS[precision].rel_l2
    m = exported.dims.size_multiple
    requests = [(1, 2 * m, 3 * m), (3, 4 * m, 2 * m)]  # two batches, two aspect ratios
    if backend in TRT_FAMILIES:  # the corners of what the engines were built for
        requests = _profile_corners(exported, precision, backend, engine_dir)
    results: list[NetworkResult] = []
    for name in NETWORK_NAMES:
        network = exported.network(name, precision)
        graph_precision = exported.network_precision(name, precision)
        feeds = []
        for i, (batch, height, width) in enumerate(requests):
            inputs = network.sample_inputs(graph_precision, batch, height, width, seed=1000 + i)
            feeds.append(OrderedDict((k, v.numpy()) for k, v in inputs.items()))
        dtypes = {k: v.dtype for k, v in feeds[0].items()}
        runners = [
            _graph_runner(backend, exported, name, precision, engine_dir),
            TorchNetworkRunner(network, components[network.component], dtypes),
        ]
        with G_LOGGER.verbosity(G_LOGGER.ERROR):
            run = Comparator.run(runners, data_loader=feeds)
        (_, graph_iterations), (_, torch_iterations) = run
        output = network.output_name
        for feed, got, want in zip(feeds, graph_iterations, torch_iterations, strict=True):
            a = np.asarray(got[output], np.float64)
            b = np.asarray(want[output], np.float64)
            norm_a, norm_b = float(np.linalg.norm(a)), float(np.linalg.norm(b))
            rel = float(np.linalg.norm(a - b)) / max(norm_b, 1e-30)
            cosine = float((a * b).sum()) / max(norm_a * norm_b, 1e-30)
            shape = "x".join(str(s) for s in next(iter(feed.values())).shape)
            results.append(
                NetworkResult(
                    name, shape, float(np.abs(a - b).max()), rel, cosine, bool(rel <= limit)
                )
            )
    return results


def compare_images(got: np.ndarray, want: np.ndarray, precision: str) -> ImageResult:
    a = np.round(np.clip(got, 0, 1) * 255).astype(np.int16)
    b = np.round(np.clip(want, 0, 1) * 255).astype(np.int16)
    mse = float(((a - b).astype(np.float64) ** 2).mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    levels = int(np.abs(a - b).max())
    t = THRESHOLDS[precision]
    return ImageResult(psnr, levels, bool(levels <= t.max_levels and psnr >= t.min_psnr))


def run_check(
    exported: ExportedModel,
    components: dict[str, Any],
    *,
    backend: str,
    precision: str,
    steps: int = 8,
    strength: float = 0.75,
    scheduler: str = "lms",
    engine_dir: str | None = None,
) -> dict[str, Any]:
    """Every network against PyTorch, then one img2img image against the torch backend.
    ``engine_dir``: the TensorRT engines ``sdtrt build --engine-dir`` wrote there."""
    from sdtrt.options import backend_options
    from sdtrt.runtime.pipeline import Img2ImgPipeline

    networks = compare_networks(exported, components, precision, backend, engine_dir)
    m = exported.dims.size_multiple
    image = torch.rand(1, 3, 2 * m, 3 * m, generator=torch.Generator().manual_seed(7))
    run: dict[str, Any] = dict(strength=strength, num_inference_steps=steps, output_type="np")
    options = backend_options(backend, precision=precision, engine_dir=engine_dir)
    graph_pipe = Img2ImgPipeline.from_pretrained(
        exported.root, options, scheduler, show_progress=False
    )
    torch_pipe = Img2ImgPipeline.from_components(
        components, scheduler=scheduler, show_progress=False
    )
    traces: list[list[torch.Tensor]] = []
    images = []
    for pipe in (graph_pipe, torch_pipe):
        trace = _LatentTrace()
        images.append(
            pipe(
                "a photo",
                image,
                generator=torch.Generator().manual_seed(0),
                callback_on_step_end=trace,
                **run,
            ).images
        )
        traces.append(trace.latents)
    got, want = images
    image_result = compare_images(got, want, precision)
    passed = all(r.passed for r in networks) and image_result.passed
    return {
        "backend": backend,
        "precision": precision,
        "thresholds": asdict(THRESHOLDS[precision]),
        "networks": [asdict(r) for r in networks],
        "image": asdict(image_result),
        "steps": step_drift(*traces),
        "passed": passed,
    }


class _LatentTrace:
    """A step-end callback (diffusers' signature) keeping each step's latents."""

    def __init__(self) -> None:
        self.latents: list[torch.Tensor] = []

    def __call__(self, pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        self.latents.append(tensors["latents"].detach().double().cpu())
        return {}


def step_drift(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    """||backend - torch|| / ||torch|| of the latents after each denoising step: where in
    the loop a difference appears and whether the steps grow it (informational: the image
    is what passes or fails)."""
    return [
        float((a - b).norm() / max(float(b.norm()), 1e-30)) for a, b in zip(got, want, strict=True)
    ]


def format_report(report: dict[str, Any]) -> str:
    t = report["thresholds"]
    lines = [
        f"check: {report['backend']} {report['precision']} against PyTorch fp32",
        "",
        "| network | input shape | max abs | rel L2 | cosine | pass |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["networks"]:
        lines.append(
            f"| {r['network']} | {r['shape']} | {r['max_abs']:.3g} | {r['rel_l2']:.3g} | "
            f"{r['cosine']:.8f} | {'yes' if r['passed'] else 'NO'} |"
        )
    img = report["image"]
    drift = report.get("steps") or []
    if drift:
        worst = max(range(len(drift)), key=drift.__getitem__)
        lines += [
            "",
            f"latents after each of the {len(drift)} steps, rel L2 against torch: "
            + ", ".join(f"{d:.2g}" for d in drift)
            + f" (largest after step {worst + 1})",
        ]
    lines += [
        "",
        f"img2img image: PSNR {img['psnr']:.2f} dB, max diff {img['max_levels']} levels of 255 "
        f"({'pass' if img['passed'] else 'FAIL'})",
        f"thresholds: rel L2 <= {t['rel_l2']:g} per network; image within {t['max_levels']} "
        f"levels and PSNR >= {t['min_psnr']:g} dB",
        "PASSED" if report["passed"] else "FAILED",
    ]
    return "\n".join(lines)
