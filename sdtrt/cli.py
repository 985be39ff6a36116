"""The ``sdtrt`` command line: parse, check, call one library function. Heavy modules are
imported inside the handlers so ``--help`` and argument errors are instant."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sdtrt.errors import SdtrtError

SAMPLE_IMAGE = Path(__file__).parent / "assets" / "sample.png"
SEED_PROMPT = "A colorful dancer, nat geo photo"
SCHEDULER_NAMES = ("lms", "ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "unipc")
BACKEND_NAMES = ("torch", "onnxruntime", "tensorrt")


def _add_img2img(sub: Any) -> None:
    p = sub.add_parser("img2img", help="run img2img (defaults: the seed notebook's run)")
    p.add_argument("--image", default=str(SAMPLE_IMAGE), help="input image (default: sample)")
    p.add_argument("--prompt", default=SEED_PROMPT)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--model", default="tiny", help="tiny | sd15-random | sd21-random | PATH")
    p.add_argument("--backend", default="torch", choices=BACKEND_NAMES)
    knob = p.add_mutually_exclusive_group()
    knob.add_argument("--strength", type=float, default=None, help="in (0, 1]; default 0.8")
    knob.add_argument("--start-step", type=int, default=None, help="first step, in [0, steps)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=8.0)
    p.add_argument("--scheduler", default="lms", choices=SCHEDULER_NAMES)
    p.add_argument("--seed", type=int, default=32)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="images per prompt")
    p.add_argument(
        "--precision",
        default=None,
        choices=("fp32", "fp16"),
        help="graph backends (default: fp16 for tensorrt, fp32 for onnxruntime)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="torch backend")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"), help="torch backend")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the UNet as a CUDA graph")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="out/img2img.png")
    p.set_defaults(handler=_run_img2img)


def _run_img2img(args: argparse.Namespace) -> int:
    from sdtrt.runtime.inputs import (
        check_size,
        check_steps_and_guidance,
        load_image,
        resolve_start_step,
    )

    # Everything the user typed is checked before any model is loaded.
    check_steps_and_guidance(args.steps, args.guidance)
    resolve_start_step(args.steps, args.strength, args.start_step)
    check_size(args.height, args.width, 8)
    if args.batch < 1:
        raise _invalid(f"batch must be >= 1, got {args.batch}")
    image = load_image(args.image)

    import torch

    from sdtrt.api import build_pipeline
    from sdtrt.fileio import atomic_path

    pipe = build_pipeline(
        args.model,
        backend=args.backend,
        scheduler=args.scheduler,
        precision=args.precision,
        device=args.device,
        dtype=args.dtype,
        cuda_graphs=args.cuda_graphs,
        show_progress=not args.no_progress,
    )
    result = pipe(
        args.prompt,
        image,
        strength=args.strength,
        start_step=args.start_step,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt,
        generator=torch.Generator().manual_seed(args.seed),
        num_images_per_prompt=args.batch,
        height=args.height,
        width=args.width,
    )
    out = Path(args.out)
    paths = (
        [out]
        if len(result.images) == 1
        else [
            out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")
            for i in range(len(result.images))
        ]
    )
    for picture, path in zip(result.images, paths, strict=True):
        with atomic_path(path) as tmp:
            picture.save(tmp, format="PNG")
        print(f"wrote {path} ({picture.width}x{picture.height})")
    stages = ", ".join(f"{k} {v:.0f} ms" for k, v in result.timings_ms.items())
    print(f"{result.unet_calls} UNet calls; {stages}")
    return 0


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="export the four networks to ONNX (Hugging Face layout)")
    p.add_argument("--model", default="tiny", help="tiny | sd15-random | sd21-random | PATH")
    p.add_argument("--out", required=True, help="folder to write (replaced atomically)")
    p.add_argument("--precision", default="fp32", help="comma-separated: fp32,fp16")
    p.add_argument("--vae-precision", default=None, choices=("fp32", "fp16"))
    p.add_argument("--opset", type=int, default=20)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from sdtrt.export.exporter import check_export_options, export_model
    from sdtrt.models import load_components

    precisions = tuple(p.strip() for p in args.precision.split(",") if p.strip())
    check_export_options(precisions, args.opset, args.vae_precision)
    components = load_components(args.model)
    out = export_model(
        components,
        args.out,
        source=_source_name(args.model),
        precisions=precisions,
        opset=args.opset,
        vae_precision=args.vae_precision,
        show_progress=not args.no_progress,
    )
    print(f"exported {args.model} ({', '.join(precisions)}) to {out}")
    return 0


def _source_name(model: str) -> str:
    """Built-in names as they are; folders as absolute paths, so `check` finds them again."""
    from sdtrt.models import BUILTIN_MODELS

    return model if model in BUILTIN_MODELS else str(Path(model).resolve())


def _add_check(sub: Any) -> None:
    p = sub.add_parser("check", help="compare a backend's networks and image with PyTorch")
    p.add_argument("--model", required=True, help="exported folder, or a model to export first")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.set_defaults(handler=_run_check)


def _run_check(args: argparse.Namespace) -> int:
    from sdtrt.api import is_exported_folder
    from sdtrt.bench.check import format_report, run_check
    from sdtrt.fileio import write_json
    from sdtrt.models import load_components

    if is_exported_folder(args.model):
        exported = _exported(args.model, args.precision)
        components = exported.source_components()
    else:
        components = load_components(args.model)
        exported = _exported(args.model, args.precision, components)
    report = run_check(exported, components, backend=args.backend, precision=args.precision)
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
    return 0 if report["passed"] else 1


def _exported(model: str, precision: str, components: dict[str, Any] | None = None) -> Any:
    """An exported folder as it is, or a model exported into the cache (once)."""
    from sdtrt.api import is_exported_folder
    from sdtrt.export.cache import exported_for
    from sdtrt.export.folder import ExportedModel
    from sdtrt.models import load_components

    if is_exported_folder(model):
        return ExportedModel.open(Path(model))
    if components is None:
        components = load_components(model)
    return exported_for(components, precision=precision, source=_source_name(model))


def _add_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="latency per stage, throughput, with diffusers side by side")
    p.add_argument("--model", default="tiny", help="tiny | sd15-random | sd21-random | PATH | DIR")
    p.add_argument("--backends", default="torch,onnxruntime,diffusers")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--strength", type=float, default=0.8)
    p.add_argument("--scheduler", default="lms", choices=SCHEDULER_NAMES)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"), help="graph backends")
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--ort-optimization", default="auto", help="auto: all for the VAE, basic else")
    p.add_argument("--ort-threads", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from sdtrt.bench.benchmark import BenchConfig, run_bench
    from sdtrt.bench.report import markdown_table, plot
    from sdtrt.fileio import write_json
    from sdtrt.runtime.inputs import check_size, resolve_start_step

    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        raise _invalid(f"--batch must be comma-separated integers, got {args.batch!r}") from None
    resolve_start_step(args.steps, args.strength, None)
    check_size(args.height, args.width, 8)
    config = BenchConfig(
        model=args.model,
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
        batches=batches,
        height=args.height,
        width=args.width,
        steps=args.steps,
        strength=args.strength,
        scheduler=args.scheduler,
        device=args.device,
        dtype=args.dtype,
        precision=args.precision,
        cuda_graphs=args.cuda_graphs,
        warmup=args.warmup,
        repeats=args.repeats,
        ort_optimization=args.ort_optimization,
        ort_threads=args.ort_threads,
    )
    record = run_bench(config)
    print(markdown_table(record))
    if args.json:
        write_json(args.json, record)
    if args.plot:
        plot(record, args.plot)
    return 0


def _parse_range(text: str, what: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.split("-")]
    except ValueError:
        raise _invalid(f"--{what} must be N or MIN-MAX, got {text!r}") from None
    if len(parts) not in (1, 2):
        raise _invalid(f"--{what} must be N or MIN-MAX, got {text!r}")
    return parts[0], parts[-1]


def _add_build(sub: Any) -> None:
    p = sub.add_parser("build", help="build TensorRT engines from an exported folder")
    p.add_argument("--model", required=True, help="exported folder, or a model to export first")
    p.add_argument("--precision", default="fp16", choices=("fp32", "fp16"))
    p.add_argument("--batch", default="1-4", help="images per request: N or MIN-MAX")
    p.add_argument("--height", default="256-768", help="pixels: N or MIN-MAX")
    p.add_argument("--width", default="256-768", help="pixels: N or MIN-MAX")
    p.add_argument("--opt-batch", type=int, default=1)
    p.add_argument("--opt-height", type=int, default=512)
    p.add_argument("--opt-width", type=int, default=512)
    p.add_argument("--static", action="store_true", help="min = opt = max: lowest latency")
    p.add_argument("--optimization-level", type=int, default=3, choices=range(6))
    p.add_argument("--workspace-gb", type=float, default=None)
    p.add_argument("--engine-dir", default=None, help="default: DIR/tensorrt")
    p.set_defaults(handler=_run_build)


def _run_build(args: argparse.Namespace) -> int:
    from sdtrt.engine.trt_build import BuildOptions, build_engines, require_tensorrt
    from sdtrt.engine.trt_profile import BuildRanges

    ranges = BuildRanges(
        batch=_parse_range(args.batch, "batch"),
        height=_parse_range(args.height, "height"),
        width=_parse_range(args.width, "width"),
        opt_batch=args.opt_batch,
        opt_height=args.opt_height,
        opt_width=args.opt_width,
        static=args.static,
    )
    require_tensorrt()  # a machine without TensorRT or a GPU is told so before any work
    exported = _exported(args.model, args.precision)
    ranges.check(exported.dims.size_multiple)
    options = BuildOptions(
        ranges=ranges, optimization_level=args.optimization_level, workspace_gb=args.workspace_gb
    )
    engine_dir = Path(args.engine_dir) if args.engine_dir else None
    for network, path in build_engines(exported, args.precision, options, engine_dir).items():
        print(f"{network}: {path}")
    return 0


def _invalid(message: str) -> SdtrtError:
    from sdtrt.errors import InvalidInputError

    return InvalidInputError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtrt", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_SUBCOMMANDS: list[Callable[[Any], None]] = [
    _add_img2img,
    _add_export,
    _add_build,
    _add_check,
    _add_bench,
]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Our INFO lines, but only the warnings of the exporters' chatty loggers.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sdtrt").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.handler(args))
    except SdtrtError as exc:
        print(f"sdtrt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdtrt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
