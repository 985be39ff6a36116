"""sdtrt: Stable Diffusion img2img on TensorRT, ONNX Runtime and PyTorch.

Start with `sdtrt img2img` (the seed notebook's run on the embedded tiny model), then
`sdtrt export` a model to ONNX, `sdtrt build` TensorRT engines from it, `sdtrt check` a
backend against PyTorch and `sdtrt bench` them side by side. Folders optimum exported run
as they are (`sdtrt adopt` stores their manifest). `sdtrt COMMAND --help` lists each
command's options with their defaults."""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

from sdtrt.bench.config import BENCH_BACKENDS, SOURCE_FIELDS, BenchConfig
from sdtrt.errors import EngineBuildError, InvalidInputError, SdtrtError
from sdtrt.options import (
    BACKENDS,
    DEVICES,
    GRAPH_BACKENDS,
    OPT_DEFAULTS,
    ORT_OPTIMIZATION_LEVELS,
    PRECISIONS,
    RTX_TARGETS,
    SCHEDULER_NAMES,
    SEED_PROMPT,
    TRT_FAMILIES,
    UNET_SWITCHES,
    BuildOptions,
    BuildRanges,
    ExportOptions,
    Img2ImgJob,
    ModelSource,
    OrtOptions,
    ServeOptions,
    TensorRTOptions,
    TorchOptions,
    expand_home,
    one_gpu_hint,
    parse_embedding,
    parse_integers,
    parse_lora,
    parse_numbers,
    parse_sizes,
)

MODEL_HELP = (
    "tiny | tiny-random | sd15-random | sd21-random | a diffusers folder | an sdtrt export | "
    "an optimum ONNX export | a .safetensors checkpoint (with --config)"
)
REFERENCE_HELP = (
    "the PyTorch model to compare with (name or diffusers folder) where --model is an ONNX "
    "folder that records none (optimum's)"
)
PRECISION_HELP = (
    f"graph backends: which exported graphs run (default: {TensorRTOptions.precision} for "
    f"the TensorRT backends, {OrtOptions.precision} for onnxruntime)"
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where there is one; options whose default depends on another option
    say so in their help instead of printing None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


STEP_GRAPHS_HELP = (
    "torch (with --device cuda) and the TensorRT backends: each whole step (UNet, guidance, "
    "scheduler) as one CUDA graph (every scheduler but dpmpp_2m_sde_karras and tcd; they and "
    "unusual scheduler settings: the UNet alone)"
)

GUIDANCE_CUTOFF_HELP = (
    "share of the steps run under guidance, in [0, 1] (diffusers' SDCFGCutoffCallback): "
    "guidance ends after step int(steps x it), the rest on the prompt alone, half the UNet's "
    "rows (default: guided throughout)"
)


def _add_model_source(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--variant",
        default=None,
        help="a diffusers folder's weight variant, e.g. fp16 (default: the default weights, "
        "else the variant there is)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="a single checkpoint's architecture: a diffusers folder of the same model, or "
        "the original YAML",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load a .ckpt checkpoint: it is a pickle, and unpickling runs code from the file",
    )
    p.add_argument(
        "--vae",
        default=None,
        metavar="FILE_OR_DIR",
        help="another VAE in place of the model's: a file in the original layout (A1111's 'SD "
        "VAE', e.g. vae-ft-mse-840000-ema-pruned.safetensors) or a diffusers VAE folder "
        "(AutoencoderKL, or TAESD's AutoencoderTiny: madebyollin/taesd; or a folder of "
        "TAESD's taesd_encoder and taesd_decoder files)",
    )
    p.add_argument(
        "--lora",
        dest="loras",
        type=_argument(parse_lora),
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="fuse a LoRA (.safetensors: diffusers', kohya's or PEFT's layout) into the "
        "weights at SCALE (default 1); repeat for several. An export keeps those it was "
        "exported with",
    )
    p.add_argument(
        "--embedding",
        dest="embeddings",
        type=_argument(parse_embedding),
        action="append",
        default=[],
        metavar="FILE[:TOKEN]",
        help="add a textual inversion embedding (.safetensors: A1111's or diffusers' layout), "
        "called TOKEN in prompts (default: the file's name without its extension, as A1111 "
        "does); repeat for several. An export keeps those it was exported with",
    )
    p.add_argument(
        "--clip-skip",
        type=int,
        default=None,
        metavar="N",
        help="leave out the text encoder's last N layers, as diffusers' clip_skip (1: the "
        "penultimate layer, what web UIs call 'Clip skip 2'); an export keeps the one it was "
        "exported with (default: every layer)",
    )


def _source_options(args: argparse.Namespace) -> dict[str, Any]:
    """ModelSource's fields as --model and _add_model_source's options give them (each
    option's dest is the field's name; repeated options as tuples)."""
    given = {name: getattr(args, name) for name in SOURCE_FIELDS}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}


def _source(args: argparse.Namespace) -> ModelSource:
    return ModelSource(**_source_options(args))


def _argument(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An option's type from a parser of sdtrt.options: its message is argparse's error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except InvalidInputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _device(text: str) -> str:
    """--device's type: cpu or cuda (argparse checks the choice); ``cuda:N``, torch's name
    for one GPU of several, is answered with how sdtrt picks that GPU."""
    if hint := one_gpu_hint(text):
        raise argparse.ArgumentTypeError(f"{text}: {hint}")
    return text


def _add_backend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default=None, choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument(
        "--device",
        default=None,
        choices=DEVICES,
        type=_device,
        help=f"torch: where it runs (default: {TorchOptions.device}); onnxruntime: its "
        "provider (default: cuda where onnxruntime-gpu is installed)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=PRECISIONS,
        help=f"torch backend: the modules' dtype (default: {TorchOptions.dtype})",
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="torch (with --device cuda) and the TensorRT backends: the UNet as a CUDA graph",
    )
    _add_engine_dir(p)
    _add_unet_tuning(p)


def _add_engine_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine-dir",
        default=None,
        help="TensorRT backends: the engines `sdtrt build --engine-dir` wrote there, run as "
        "they are (default: MODEL/tensorrt for an export, else the cache's, built when missing)",
    )


# The torch backend's ways to a faster UNet, one switch each (TorchOptions says what each does).
UNET_TUNING_HELP = {
    "channels_last": "torch: the UNet's weights channels-last (NHWC convolutions)",
    "fuse_qkv": "torch: diffusers' fused query/key/value projections in the UNet",
    "compile_unet": "torch: torch.compile the UNet (inductor; compiles on each new shape)",
}


def _add_unet_tuning(p: argparse.ArgumentParser) -> None:
    for field, flag in UNET_SWITCHES.items():
        p.add_argument(flag, dest=field, action="store_true", help=UNET_TUNING_HELP[field])


def _add_img2img(sub: Any) -> None:
    job = Img2ImgJob
    p = sub.add_parser(
        "img2img",
        help="run img2img (defaults: the seed notebook's run)",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--image", default=None, help="input image (default: a sample picture)")
    p.add_argument("--prompt", default=SEED_PROMPT, help="what the picture should show")
    p.add_argument("--negative-prompt", default=None, help="what it should not show")
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    _add_model_source(p)
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="what runs the networks")
    knob = p.add_mutually_exclusive_group()
    knob.add_argument(
        "--strength", type=float, default=None, help="noise added, in (0, 1] (default: 0.8)"
    )
    knob.add_argument(
        "--start-step", type=int, default=None, help="first step, in [0, steps): the same knob"
    )
    p.add_argument("--steps", type=int, default=job.steps, help="scheduler steps")
    p.add_argument("--guidance", type=float, default=job.guidance, help="guidance scale")
    p.add_argument(
        "--guidance-cutoff",
        type=float,
        default=None,
        help=GUIDANCE_CUTOFF_HELP,
    )
    p.add_argument("--scheduler", default="lms", choices=SCHEDULER_NAMES, help="scheduler")
    schedule = p.add_mutually_exclusive_group()
    schedule.add_argument(
        "--timesteps",
        type=_argument(parse_integers),
        default=None,
        help="a schedule in place of --steps, e.g. Align Your Steps' for SD 1.5: "
        "999,850,736,645,545,455,343,233,124,24 (euler, dpmpp_2m, lcm, tcd)",
    )
    schedule.add_argument(
        "--sigmas",
        type=_argument(parse_numbers),
        default=None,
        help="or its sigmas, one more than the steps (euler)",
    )
    p.add_argument(
        "--eta", type=float, default=job.eta, help="ddim's per-step noise (tcd's gamma), in [0, 1]"
    )
    p.add_argument("--seed", type=int, default=job.seed, help="in [0, 2^64 - 1]")
    p.add_argument(
        "--height", type=int, default=None, help="pixels (default: the image's, rounded down)"
    )
    p.add_argument(
        "--width", type=int, default=None, help="pixels (default: the image's, rounded down)"
    )
    p.add_argument("--batch", type=int, default=job.batch, help="images per prompt")
    _add_backend_options(p)
    p.add_argument("--step-graphs", action="store_true", help=STEP_GRAPHS_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--out",
        default=job.out,
        help="output image, PNG/JPEG/WebP by extension (JPEG at quality 95, WebP 90); a batch "
        "writes NAME-0.EXT, NAME-1.EXT...",
    )
    p.set_defaults(handler=_run_img2img)


def _backend(args: argparse.Namespace) -> Any:
    from sdtrt.options import backend_options

    return backend_options(
        args.backend,
        precision=args.precision,
        device=args.device,
        dtype=args.dtype,
        cuda_graphs=args.cuda_graphs,
        step_graphs=getattr(args, "step_graphs", False),  # img2img's; the server batches steps
        engine_dir=args.engine_dir,
        **{field: getattr(args, field) for field in UNET_SWITCHES},
    )


def _run_img2img(args: argparse.Namespace) -> int:
    from sdtrt.api import img2img

    job = Img2ImgJob(
        prompt=args.prompt,
        image=args.image,
        negative_prompt=args.negative_prompt,
        strength=args.strength,
        start_step=args.start_step,
        steps=args.steps,
        guidance=args.guidance,
        eta=args.eta,
        seed=args.seed,
        height=args.height,
        width=args.width,
        batch=args.batch,
        timesteps=args.timesteps,
        sigmas=args.sigmas,
        guidance_cutoff=args.guidance_cutoff,
        out=args.out,
    )
    result, paths = img2img(
        _source(args), job, _backend(args), args.scheduler, show_progress=not args.no_progress
    )
    for picture, path in zip(result.images, paths, strict=True):
        print(f"wrote {path} ({picture.width}x{picture.height})")
    stages = ", ".join(f"{k} {v:.0f} ms" for k, v in result.timings_ms.items())
    print(f"{result.unet_calls} UNet calls; {stages}")
    return 0


def _add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export the four networks to ONNX (Hugging Face layout)",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    _add_model_source(p)
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
    out = export(_source(args), args.out, options, show_progress=not args.no_progress)
    print(f"exported {args.model} ({', '.join(precisions)}) to {out}")
    return 0


def _add_check(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="compare a backend's networks and image with PyTorch; exit 1 on failure",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    _add_model_source(p)
    p.add_argument(
        "--backend", default="onnxruntime", choices=GRAPH_BACKENDS, help="what is checked"
    )
    p.add_argument("--precision", default=None, choices=PRECISIONS, help=PRECISION_HELP)
    _add_engine_dir(p)
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
    report = check(_source(args), args.backend, args.precision, args.reference, args.engine_dir)
    print(format_report(report))
    if args.json:
        write_json(args.json, report)
    return 0 if report["passed"] else 1


def _add_bench(sub: Any) -> None:
    config = BenchConfig  # its class defaults: an instance would check the environment
    p = sub.add_parser(
        "bench",
        help="latency per stage, throughput, with diffusers side by side",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", default=config.model, help=MODEL_HELP)
    _add_model_source(p)
    p.add_argument("--reference", default=None, help=REFERENCE_HELP + " (torch, diffusers rows)")
    p.add_argument(
        "--backends",
        default=",".join(config.backends),
        help="comma-separated rows, among: " + ", ".join(BENCH_BACKENDS) + "; a torch or "
        "TensorRT row may add switches of its own (torch+step-graphs+compile)",
    )
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--height", type=int, default=config.height, help="pixels")
    p.add_argument("--width", type=int, default=config.width, help="pixels")
    p.add_argument("--steps", type=int, default=config.steps, help="scheduler steps")
    p.add_argument("--strength", type=float, default=config.strength, help="in (0, 1]")
    p.add_argument("--scheduler", default=config.scheduler, choices=SCHEDULER_NAMES, help="")
    p.add_argument(
        "--guidance",
        type=float,
        default=config.guidance,
        help="guidance scale (1 or less: the prompt row alone, as LCM-LoRA runs)",
    )
    p.add_argument(
        "--guidance-cutoff",
        type=float,
        default=None,
        help=GUIDANCE_CUTOFF_HELP + "; every row runs it, diffusers' too",
    )
    p.add_argument(
        "--device", default=config.device, choices=DEVICES, type=_device, help="torch and diffusers"
    )
    p.add_argument("--dtype", default=config.dtype, choices=PRECISIONS, help="torch and diffusers")
    p.add_argument("--precision", default=None, choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument("--cuda-graphs", action="store_true", help="torch and TensorRT")
    p.add_argument("--step-graphs", action="store_true", help=STEP_GRAPHS_HELP)
    _add_engine_dir(p)
    _add_unet_tuning(p)
    p.add_argument(
        "--profile",
        default=None,
        metavar="DIR",
        help="one more run per row under torch.profiler: traces in DIR, GPU busy vs idle",
    )
    p.add_argument("--warmup", type=int, default=config.warmup, help="runs before timing")
    p.add_argument("--repeats", type=int, default=config.repeats, help="timed runs")
    p.add_argument(
        "--ort-optimization",
        default=config.ort_optimization,
        choices=ORT_OPTIMIZATION_LEVELS,
        help="auto: all for the VAE, basic else",
    )
    p.add_argument(
        "--ort-threads", type=int, default=config.ort_threads, help="0: ONNX Runtime chooses"
    )
    _add_record_outputs(p)
    p.set_defaults(handler=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from sdtrt.bench.benchmark import run_bench
    from sdtrt.bench.report import markdown_table, plot

    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        raise _invalid(f"--batch must be comma-separated integers, got {args.batch!r}") from None
    config = BenchConfig(
        **{SOURCE_FIELDS[name]: value for name, value in _source_options(args).items()},
        reference=args.reference,
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
        batches=batches,
        height=args.height,
        width=args.width,
        steps=args.steps,
        strength=args.strength,
        scheduler=args.scheduler,
        guidance=args.guidance,
        guidance_cutoff=args.guidance_cutoff,
        device=args.device,
        dtype=args.dtype,
        precision=args.precision,
        cuda_graphs=args.cuda_graphs,
        step_graphs=args.step_graphs,
        **{field: getattr(args, field) for field in UNET_SWITCHES},
        profile=args.profile,
        warmup=args.warmup,
        repeats=args.repeats,
        ort_optimization=args.ort_optimization,
        ort_threads=args.ort_threads,
        engine_dir=args.engine_dir,
    )
    _check_record_outputs(args)
    progress = None
    if args.json:  # each row as it is measured: a run cut short keeps what it finished
        from sdtrt.fileio import write_json

        progress = functools.partial(write_json, args.json)
    record = run_bench(config, progress=progress)
    print(markdown_table(record))
    _write_record_outputs(args, record, plot)
    if not any(row["status"] == "ok" for row in record["results"]):
        print("sdtrt: bench: every backend was skipped: nothing was measured", file=sys.stderr)
        return 1
    failed = [row["backend"] for row in record["results"] if row["status"] == "failed"]
    if failed:
        print(f"sdtrt: bench: failed while measured: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _add_record_outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="also write the record here")
    p.add_argument("--plot", default=None, help="also plot it here (PNG, SVG or PDF)")


def _check_record_outputs(args: argparse.Namespace) -> None:
    """Both output paths checked before any model loads or anything is measured."""
    from sdtrt.bench.report import check_plot_path
    from sdtrt.fileio import check_output_file

    if args.json:
        check_output_file(args.json, "--json")
    if args.plot:
        check_plot_path(args.plot)


def _write_record_outputs(
    args: argparse.Namespace, record: dict[str, Any], plot: Callable[..., None]
) -> None:
    from sdtrt.fileio import write_json

    if args.json:
        write_json(args.json, record)
    if args.plot:
        plot(record, args.plot)


def _span(values: tuple[int, int]) -> str:
    return f"{values[0]}-{values[1]}"


def _parse_range(text: str, what: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.split("-")]
    except ValueError:
        raise _invalid(f"--{what} must be N or MIN-MAX, got {text!r}") from None
    if len(parts) not in (1, 2):
        raise _invalid(f"--{what} must be N or MIN-MAX, got {text!r}")
    return parts[0], parts[-1]


def _add_build(sub: Any) -> None:
    ranges, options = BuildRanges(), BuildOptions()
    p = sub.add_parser(
        "build",
        help="build TensorRT engines from an exported folder",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", required=True, help=MODEL_HELP + " (exported into the cache)")
    _add_model_source(p)
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
        raise _invalid("--targets is for --backend tensorrt-rtx (tensorrt builds for this GPU)")
    options = BuildOptions(
        ranges=ranges,
        optimization_level=args.optimization_level,
        workspace_gb=args.workspace_gb,
        targets=targets,
    )
    built = build(_source(args), args.precision, options, args.engine_dir, args.backend)
    for network, path in built.items():
        print(f"{network}: {path}")
    return 0


def _add_serve(sub: Any) -> None:
    from sdtrt.options import SERVE_POLICIES

    o = ServeOptions
    p = sub.add_parser(
        "serve",
        help="serve img2img over HTTP, batching concurrent requests at every denoising step",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    _add_model_source(p)
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="what runs the networks")
    _add_backend_options(p)
    p.add_argument(
        "--scheduler", default="lms", choices=SCHEDULER_NAMES, help="the default per request"
    )
    p.add_argument("--steps", type=int, default=o.steps, help="the default per request")
    p.add_argument("--guidance", type=float, default=o.guidance, help="the default per request")
    p.add_argument(
        "--guidance-cutoff",
        type=float,
        default=None,
        help="the default per request: " + GUIDANCE_CUTOFF_HELP,
    )
    p.add_argument(
        "--strength",
        type=float,
        default=o.strength,
        help="the default per request that sends neither strength nor start_step",
    )
    p.add_argument("--host", default=o.host, help="address to listen on (loopback by default)")
    p.add_argument("--port", type=int, default=o.port, help="TCP port")
    p.add_argument(
        "--max-rows",
        type=int,
        default=None,
        help="UNet rows per call (2 per guided image; default: the TensorRT profile's "
        "maximum, else 16)",
    )
    p.add_argument("--max-queue", type=int, default=o.max_queue, help="waiting requests; 429 past")
    _add_intra_op_threads(p)
    p.add_argument("--policy", default=o.policy, choices=SERVE_POLICIES, help="batching policy")
    p.add_argument(
        "--queue-delay", type=float, default=o.queue_delay, help="request policy: seconds"
    )
    p.add_argument("--timeout", type=float, default=o.timeout, help="seconds per request (504)")
    p.add_argument("--drain-timeout", type=float, default=o.drain_timeout, help="on SIGTERM")
    p.add_argument("--max-body-mb", type=float, default=o.max_body_mb, help="413 past it")
    p.add_argument(
        "--warmup-sizes",
        default=None,
        help="HxW,HxW: before /ready, run every UNet row count and VAE batch the server can "
        "form at these sizes, so that CUDA graph captures and per-shape compiles (--compile, "
        "TensorRT-RTX) happen before the first requests, not during them (default: one "
        "small request)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="required on /v1 and /metrics (else $SDTRT_API_KEY, which keeps it out of the "
        "process list; neither: open)",
    )
    ray = p.add_argument_group("scale-out on Ray Serve (pip install 'sdtrt[ray]')")
    ray.add_argument("--ray", action="store_true", help="serve as a Ray Serve application")
    ray.add_argument(
        "--address", default=None, help="a running Ray cluster (default: start a local one)"
    )
    ray.add_argument("--replicas", type=int, default=1, help="replicas, one pipeline each")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscale from")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscale to")
    ray.add_argument("--gpus-per-replica", type=float, default=0.0, help="Ray num_gpus")
    p.set_defaults(handler=_run_serve)


def _add_intra_op_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--intra-op-threads",
        default=str(ServeOptions.intra_op_threads),
        help="CPU device: PyTorch threads per operator in the batching worker, or 'auto' "
        "(PyTorch's own: one per core); more pays for big models on many cores",
    )


def _intra_op_threads(args: argparse.Namespace) -> int | None:
    if args.intra_op_threads == "auto":
        return None
    try:
        return int(args.intra_op_threads)
    except ValueError:
        raise _invalid(
            f"--intra-op-threads: an integer >= 1 or auto, got {args.intra_op_threads!r}"
        ) from None


def _run_serve(args: argparse.Namespace) -> int:
    from sdtrt.options import backend_options
    from sdtrt.serve.server import run

    options = ServeOptions(
        policy=args.policy,
        max_rows=args.max_rows,
        max_queue=args.max_queue,
        intra_op_threads=_intra_op_threads(args),
        queue_delay=args.queue_delay,
        timeout=args.timeout,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("SDTRT_API_KEY") or None,
        max_body_mb=args.max_body_mb,
        drain_timeout=args.drain_timeout,
        warmup_sizes=parse_sizes(args.warmup_sizes or "", "--warmup-sizes"),
        steps=args.steps,
        guidance=args.guidance,
        strength=args.strength,
        guidance_cutoff=args.guidance_cutoff,
    )
    if not args.ray:
        for flag in ("address", "min_replicas", "max_replicas"):
            if getattr(args, flag) is not None:
                raise _invalid(f"--{flag.replace('_', '-')} is for --ray")
        run(_source(args), _backend(args), args.scheduler, options)
        return 0
    try:
        from sdtrt.serve import ray_app
    except ImportError:
        raise _unavailable("--ray needs Ray Serve: pip install 'sdtrt[ray]'") from None
    backend_kwargs = {
        k: v
        for k in ("precision", "device", "dtype", "cuda_graphs", "engine_dir", *UNET_SWITCHES)
        if (v := getattr(args, k)) not in (None, False)
    }
    backend_options(args.backend, **backend_kwargs)  # refused here, not on each replica
    application = ray_app.application(
        _source(args),
        args.backend,
        backend_kwargs,
        args.scheduler,
        options,
        args.replicas,
        args.min_replicas,
        args.max_replicas,
        args.gpus_per_replica,
    )
    ray_app.run(application, args.host, args.port, args.address)
    return 0


def _add_bench_serve(sub: Any) -> None:
    from sdtrt.serve.loadgen import LoadConfig

    c = LoadConfig
    p = sub.add_parser(
        "bench-serve",
        help="open-loop Poisson load on sdtrt serve over loopback: one-at-a-time, "
        "request-level and step-level batching compared",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", default="tiny", help=MODEL_HELP)
    _add_model_source(p)
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="what runs the networks")
    _add_backend_options(p)
    p.add_argument("--rates", default=",".join(f"{r:g}" for r in c.rates), help="req/s, comma")
    p.add_argument("--requests", type=int, default=c.requests, help="per policy and rate")
    p.add_argument("--duration", type=float, default=c.duration, help="seconds of sending, max")
    p.add_argument("--policies", default=",".join(c.policies), help="comma-separated")
    p.add_argument("--steps", type=int, default=c.steps, help="scheduler steps per request")
    p.add_argument("--strength", default="0.3-1.0", help="uniform range LOW-HIGH")
    p.add_argument("--sizes", default="512x512", help="HxW, comma-separated: drawn per request")
    p.add_argument("--guidance", type=float, default=c.guidance, help="guidance scale")
    p.add_argument(
        "--guidance-cutoff", type=float, default=None, help="per request: " + GUIDANCE_CUTOFF_HELP
    )
    p.add_argument("--scheduler", default=c.scheduler, choices=SCHEDULER_NAMES, help="scheduler")
    p.add_argument("--queue-delay", type=float, default=c.queue_delay, help="request policy")
    p.add_argument("--max-rows", type=int, default=None, help="UNet rows per call")
    _add_intra_op_threads(p)
    p.add_argument(
        "--url",
        default=None,
        help="drive the server already running there (e.g. sdtrt serve --ray) as it is "
        "configured, instead of starting one per policy; its API key from $SDTRT_API_KEY",
    )
    _add_record_outputs(p)
    p.set_defaults(handler=_run_bench_serve)


def _run_bench_serve(args: argparse.Namespace) -> int:
    from sdtrt.serve.loadgen import LoadConfig, markdown_table, plot, ratios, run_load_bench

    try:
        rates = tuple(float(r) for r in args.rates.split(","))
        low, high = (float(v) for v in args.strength.split("-"))
    except ValueError:
        raise _invalid("--rates: numbers, comma-separated; --strength LOW-HIGH") from None
    sizes = parse_sizes(args.sizes, "--sizes")
    config = LoadConfig(
        rates=rates,
        requests=args.requests,
        duration=args.duration,
        policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()),
        steps=args.steps,
        strength=(low, high),
        sizes=sizes,
        guidance=args.guidance,
        guidance_cutoff=args.guidance_cutoff,
        scheduler=args.scheduler,
        queue_delay=args.queue_delay,
        max_rows=args.max_rows,
        intra_op_threads=_intra_op_threads(args),
    )
    _check_record_outputs(args)
    record = run_load_bench(_source(args), _backend(args), config, args.url)
    print(markdown_table(record))
    print("\n".join(ratios(record)))
    _write_record_outputs(args, record, plot)
    return 0 if all(r["ok"] for r in record["results"]) else 1


def _add_adopt(sub: Any) -> None:
    p = sub.add_parser(
        "adopt",
        help="store sdtrt's manifest in a Hugging Face ONNX folder another tool wrote "
        "(optimum-cli export onnx), so later runs check its graphs against it",
        formatter_class=_HelpFormatter,
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


def _unavailable(message: str) -> SdtrtError:
    from sdtrt.errors import BackendUnavailableError

    return BackendUnavailableError(message)


def _invalid(message: str) -> SdtrtError:
    from sdtrt.errors import InvalidInputError

    return InvalidInputError(message)


def build_parser() -> argparse.ArgumentParser:
    from sdtrt import __version__

    parser = argparse.ArgumentParser(
        prog="sdtrt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"sdtrt {__version__}")
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
    _add_adopt,
    _add_serve,
    _add_bench_serve,
]


class Terminated(BaseException):
    """SIGTERM arrived (``kill``, ``docker stop``, a job scheduler's time limit). A
    BaseException, as KeyboardInterrupt is, so that nothing catches it on the way out."""


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM ends a command as Ctrl-C does, through its cleanup: a half-written export,
    engine or cache entry is removed rather than left beside its destination (the default
    action kills the process where it stands). In the main thread only; the handler that
    was there before is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# The options that name files or folders (options.expand_home says why).
_PATH_OPTIONS = (
    "model", "config", "reference", "image", "out", "json", "plot", "profile", "engine_dir",
    "folder",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in _PATH_OPTIONS:
        if hasattr(args, name):
            setattr(args, name, expand_home(getattr(args, name)))
    # Our INFO lines, but only the warnings of the exporters' chatty loggers.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("sdtrt").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        with terminate_as_interrupt():
            return int(args.handler(args))
    except EngineBuildError as exc:  # not the user's input: the graph or TensorRT failed
        print(f"sdtrt: error: {exc}", file=sys.stderr)
        return 1
    except SdtrtError as exc:
        print(f"sdtrt: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # A full disk (an SD export takes gigabytes) is the machine's state, not a bug:
        # one line, as for bad input. Every writer cleans up its temporary files.
        where = f" (writing {exc.filename})" if exc.filename else ""
        print(
            f"sdtrt: error: {exc.strerror}{where}; nothing half-written was kept: free some "
            "space, or write elsewhere, and run again",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("sdtrt: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("sdtrt: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
