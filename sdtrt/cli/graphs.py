"""The commands on a model's graphs: `sdtrt export` (ONNX), `sdtrt build` (TensorRT
engines), `sdtrt check` (a backend against PyTorch), `sdtrt adopt` (another tool's export)."""

from __future__ import annotations

import argparse
from typing import Any

from sdtrt.cli.common import (
    MODEL_HELP,
    PRECISION_HELP,
    REFERENCE_HELP,
    HelpFormatter,
    add_engine_dir,
    add_model_source,
    invalid,
    source_from,
)
from sdtrt.options import (
    GRAPH_BACKENDS,
    OPT_DEFAULTS,
    PRECISIONS,
    RTX_TARGETS,
    TRT_FAMILIES,
    BuildOptions,
    BuildRanges,
    ExportOptions,
    TensorRTOptions,
)


def add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export the four networks to ONNX (Hugging Face layout)",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    add_model_source(p)
    p.add_argument(
        "--out",
        required=True,
        help="folder to write; an existing one is replaced only if empty or an sdtrt export",
    )
    p.add_argument(
        "--precision",
        default=",".join(ExportOptions.precisions),
        help="comma-separated: fp32 (model.onnx), fp16 (model_fp16.onnx)",
    )
    p.add_argument(
        "--vae-precision", default=None, choices=PRECISIONS, help="keep the VAE in this one"
    )
    p.add_argument("--opset", type=int, default=ExportOptions.opset, help="ONNX opset")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from sdtrt.api import export

    precisions = tuple(p.strip() for p in args.precision.split(",") if p.strip())
    options = ExportOptions(
        precisions=precisions, opset=args.opset, vae_precision=args.vae_precision
    )
    out = export(source_from(args), args.out, options, show_progress=not args.no_progress)
    print(f"exported {args.model} ({', '.join(precisions)}) to {out}")
    return 0


def add_build(sub: Any) -> None:
    ranges, options = BuildRanges(), BuildOptions()
    p = sub.add_parser(
        "build",
        help="build TensorRT engines from an exported folder",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help=MODEL_HELP + " (exported into the cache)")
    add_model_source(p)
    p.add_argument(
        "--backend",
        default="tensorrt",
        choices=TRT_FAMILIES,
        help="tensorrt: on and for this GPU; tensorrt-rtx: on any machine (no GPU needed), "
        "for RTX/Ampere+ GPUs",
    )
    p.add_argument(
        "--targets",
        default=None,
        help="tensorrt-rtx: compute capabilities to run on, comma-separated ("
        + ", ".join(RTX_TARGETS)
        + "), or gpu for this machine's (default: its portable set 8.0, 8.6, 8.9, 12.0+)",
    )
    p.add_argument(
        "--precision", default=TensorRTOptions.precision, choices=PRECISIONS, help="graphs"
    )
    p.add_argument("--batch", default=_span(ranges.batch), help="images: N or MIN-MAX")
    p.add_argument("--height", default=_span(ranges.height), help="pixels: N or MIN-MAX")
    p.add_argument("--width", default=_span(ranges.width), help="pixels: N or MIN-MAX")
    for name, default in OPT_DEFAULTS.items():
        p.add_argument(
            f"--opt-{name}",
            type=int,
            default=None,
            help=f"tuned for (default: {default}, or the nearest end of the range)",
        )
    p.add_argument("--static", action="store_true", help="min = opt = max: lowest latency")
    p.add_argument(
        "--optimization-level",
        type=int,
        default=options.optimization_level,
        choices=range(6),
        help="TensorRT builder level",
    )
    p.add_argument("--workspace-gb", type=float, default=None, help="default: TensorRT's")
    p.add_argument("--engine-dir", default=None, help="default: MODEL/tensorrt")
    p.set_defaults(handler=_run_build)


def _run_build(args: argparse.Namespace) -> int:
    from sdtrt.api import build

    ranges = BuildRanges(
        batch=_parse_range(args.batch, "batch"),
        height=_parse_range(args.height, "height"),
        width=_parse_range(args.width, "width"),
        opt_batch=args.opt_batch,
        opt_height=args.opt_height,
        opt_width=args.opt_width,
        static=args.static,
    )
    targets = tuple(t.strip() for t in (args.targets or "").split(",") if t.strip())
    if targets and args.backend != "tensorrt-rtx":
        raise invalid("--targets is for --backend tensorrt-rtx (tensorrt builds for this GPU)")
    options = BuildOptions(
        ranges=ranges,
        optimization_level=args.optimization_level,
        workspace_gb=args.workspace_gb,
        targets=targets,
    )
    built = build(source_from(args), args.precision, options, args.engine_dir, args.backend)
    for network, path in built.items():
        print(f"{network}: {path}")
    return 0


def _span(values: tuple[int, int]) -> str:
    return f"{values[0]}-{values[1]}"


def _parse_range(text: str, what: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.split("-")]
    except ValueError:
        raise invalid(f"--{what} must be N or MIN-MAX, got {text!r}") from None
    if len(parts) not in (1, 2):
        raise invalid(f"--{what} must be N or MIN-MAX, got {text!r}")
    return parts[0], parts[-1]


def add_check(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="compare a backend's networks and image with PyTorch; exit 1 on failure",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    add_model_source(p)
    p.add_argument(
        "--backend", default="onnxruntime", choices=GRAPH_BACKENDS, help="what is checked"
    )
    p.add_argument("--precision", default=None, choices=PRECISIONS, help=PRECISION_HELP)
    add_engine_dir(p)
    p.add_argument("--reference", default=None, help=REFERENCE_HELP)
    p.add_argument(
        "--json", default=None, help="also write the report here (a PSNR of infinity is null)"
    )
    p.set_defaults(handler=_run_check)


def _run_check(args: argparse.Namespace) -> int:
    from sdtrt.api import check
    from sdtrt.bench.check import format_report
    from sdtrt.fileio import check_output_file, write_json

    if args.json:
        check_output_file(args.json, "--json")
    report = check(source_from(args), args.backend, args.precision, args.reference, args.engine_dir)
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
    return 0 if report["passed"] else 1


def add_adopt(sub: Any) -> None:
    p = sub.add_parser(
        "adopt",
        help="store sdtrt's manifest in a Hugging Face ONNX folder another tool wrote "
        "(optimum-cli export onnx), so later runs check its graphs against it",
        formatter_class=HelpFormatter,
    )
    p.add_argument("folder", help="the folder (model_index.json, unet/model.onnx, ...)")
    p.set_defaults(handler=_run_adopt)


def _run_adopt(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sdtrt.api import adopt
    from sdtrt.export.folder import MANIFEST

    had_manifest = (Path(args.folder) / MANIFEST).is_file()
    exported = adopt(args.folder)
    dims = exported.dims
    precisions = ", ".join(exported.precisions)
    what = f"{precisions} graphs, sizes multiples of {dims.size_multiple} px"
    if had_manifest:
        print(f"{exported.root} has its manifest already ({what}): opened, nothing written")
    else:
        print(f"adopted {exported.root}: {what}, manifest in {exported.root / MANIFEST}")
    return 0
