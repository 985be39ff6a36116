"""What several commands share: the model's and the backend's options, their help, and
how the parsed options become sdtrt's typed ones."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from sdtrt.bench.config import SOURCE_FIELDS
from sdtrt.errors import InvalidInputError, SdtrtError
from sdtrt.options import (
    DEVICES,
    PRECISIONS,
    UNET_SWITCHES,
    OrtOptions,
    TensorRTOptions,
    TorchOptions,
    one_gpu_hint,
)
from sdtrt.source import ModelSource, parse_embedding, parse_lora

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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
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


def add_model_source(p: argparse.ArgumentParser) -> None:
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
        type=option_type(parse_lora),
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
        type=option_type(parse_embedding),
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


def source_fields(args: argparse.Namespace) -> dict[str, Any]:
    """ModelSource's fields as --model and add_model_source's options give them (each
    option's dest is the field's name; repeated options as tuples)."""
    given = {name: getattr(args, name) for name in SOURCE_FIELDS}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}


def source_from(args: argparse.Namespace) -> ModelSource:
    return ModelSource(**source_fields(args))


def option_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An option's type from a parser of sdtrt.options: its message is argparse's error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except InvalidInputError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def device_type(text: str) -> str:
    """--device's type: cpu or cuda (argparse checks the choice); ``cuda:N``, torch's name
    for one GPU of several, is answered with how sdtrt picks that GPU."""
    if hint := one_gpu_hint(text):
        raise argparse.ArgumentTypeError(f"{text}: {hint}")
    return text


def add_backend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default=None, choices=PRECISIONS, help=PRECISION_HELP)
    p.add_argument(
        "--device",
        default=None,
        choices=DEVICES,
        type=device_type,
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
    add_engine_dir(p)
    add_unet_tuning(p)


def add_engine_dir(p: argparse.ArgumentParser) -> None:
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


def add_unet_tuning(p: argparse.ArgumentParser) -> None:
    for field, flag in UNET_SWITCHES.items():
        p.add_argument(flag, dest=field, action="store_true", help=UNET_TUNING_HELP[field])


def backend_from(args: argparse.Namespace) -> Any:
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


def add_record_outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="also write the record here")
    p.add_argument("--plot", default=None, help="also plot it here (PNG, SVG or PDF)")


def check_record_outputs(args: argparse.Namespace) -> None:
    """Both output paths checked before any model loads or anything is measured."""
    from sdtrt.bench.report import check_plot_path
    from sdtrt.fileio import check_output_file

    if args.json:
        check_output_file(args.json, "--json")
    if args.plot:
        check_plot_path(args.plot)


def write_record_outputs(
    args: argparse.Namespace, record: dict[str, Any], plot: Callable[..., None]
) -> None:
    from sdtrt.fileio import write_json

    if args.json:
        write_json(args.json, record)
    if args.plot:
        plot(record, args.plot)


def unavailable(message: str) -> SdtrtError:
    from sdtrt.errors import BackendUnavailableError

    return BackendUnavailableError(message)


def invalid(message: str) -> SdtrtError:
    from sdtrt.errors import InvalidInputError

    return InvalidInputError(message)
