"""The library's verbs: open a model, img2img, export, build, check. The command line calls
these and prints; the bench and the server call them too. Each one checks everything it was
given, outputs included, before it loads or exports anything."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sdtrt.export.folder import ExportedModel, is_export, is_onnx_folder
from sdtrt.fileio import (
    ENCODER_SETTINGS,
    atomic_path,
    check_output_dir,
    check_output_file,
    image_format,
)
from sdtrt.options import (
    BackendOptions,
    BuildOptions,
    CacheOptions,
    ExportOptions,
    Img2ImgJob,
    default_options,
    default_precision,
)
from sdtrt.runtime.guidance import cutoff_callback
from sdtrt.runtime.inputs import Limits, load_image
from sdtrt.runtime.pipeline import Img2ImgOutput, Img2ImgPipeline
from sdtrt.source import ModelSource, as_source

logger = logging.getLogger(__name__)


def build_pipeline(
    model: str | ModelSource,
    backend: BackendOptions | str = "torch",
    scheduler: str = "lms",
    **kwargs: Any,
) -> Img2ImgPipeline:
    """A pipeline for a built-in model name, a diffusers folder or an exported folder; the
    machine is checked for the backend first (before minutes of export)."""
    from sdtrt.engine.factory import check_available

    options = default_options(backend) if isinstance(backend, str) else backend
    check_available(options)
    return Img2ImgPipeline.from_pretrained(model, options, scheduler, **kwargs)


def img2img(
    model: str | ModelSource,
    job: Img2ImgJob,
    backend: BackendOptions | str = "torch",
    scheduler: str = "lms",
    show_progress: bool = True,
) -> tuple[Img2ImgOutput, list[Path]]:
    """Run one job and write its images atomically; returns the output and the paths.
    Everything the job asks for is checked before the model loads."""
    import torch

    from sdtrt.options import SAMPLE_IMAGE

    job.check()
    image = load_image(job.image or SAMPLE_IMAGE)
    # The output takes the image's size where none is given: bound it before the model loads.
    Limits.from_env().check(
        steps=job.schedule_steps,
        batch=job.batch,
        height=job.height or image.height,
        width=job.width or image.width,
    )
    pipe = build_pipeline(model, backend, scheduler, show_progress=show_progress)
    result = pipe(
        job.prompt,
        image,
        strength=job.strength,
        start_step=job.start_step,
        num_inference_steps=job.steps,
        guidance_scale=job.guidance,
        negative_prompt=job.negative_prompt,
        eta=job.eta,
        generator=torch.Generator().manual_seed(job.seed),
        num_images_per_prompt=job.batch,
        height=job.height,
        width=job.width,
        timesteps=None if job.timesteps is None else list(job.timesteps),
        sigmas=None if job.sigmas is None else list(job.sigmas),
        callback_on_step_end=cutoff_callback(job.guidance_cutoff),
    )
    paths = job.output_paths()
    for picture, path in zip(result.images, paths, strict=True):
        with atomic_path(path) as tmp:
            kind = image_format(path)
            picture.save(tmp, format=kind, **ENCODER_SETTINGS[kind])
    return result, paths


def check_export_target(out: str | Path) -> Path:
    return check_output_dir(
        out, is_export, "--out", " (an existing sdtrt export there would be replaced)"
    )


def export(
    model: str | ModelSource,
    out: str | Path,
    options: ExportOptions = ExportOptions(),
    **kwargs: Any,
) -> Path:
    """``sdtrt export``: the model's four networks as ONNX into ``out``, atomically. An
    existing ``out`` is replaced only when it is empty or an earlier export."""
    from sdtrt.export.exporter import export_model
    from sdtrt.models import load_components, source_record

    check_export_target(out)
    components = load_components(model)
    return export_model(components, out, source=source_record(model), options=options, **kwargs)


def open_exported(
    model: str | ModelSource, precision: str, components: dict[str, Any] | None = None
) -> ExportedModel:
    """An exported folder as it is, or a model (name or diffusers folder) exported into the
    cache once at ``precision``."""
    from sdtrt.export.cache import exported_for
    from sdtrt.models import load_components, source_record

    source = as_source(model)
    if is_onnx_folder(source.model):
        return ExportedModel.open_as(source)
    if components is None:
        components = load_components(source)
    cache = CacheOptions(source=source_record(source))
    return exported_for(components, precision=precision, cache=cache)


def adopt(folder: str | Path) -> ExportedModel:
    """``sdtrt adopt``: store the manifest of a Hugging Face ONNX folder another tool wrote
    (optimum) beside its files; later opens check the graphs against it."""
    from sdtrt.export.adopt import adopt as adopt_folder

    return adopt_folder(folder)


def build(
    model: str | ModelSource,
    precision: str | None = None,
    options: BuildOptions = BuildOptions(),
    engine_dir: str | Path | None = None,
    family: str = "tensorrt",
) -> dict[str, Path]:
    """``sdtrt build``: one engine per network (reused when already built). ``family``:
    tensorrt (on and for this GPU) or tensorrt-rtx (on any machine, for its targets)."""
    from sdtrt.engine.trt_build import build_engines, require_tensorrt

    precision = precision or default_precision(family)
    if engine_dir is not None and not any(Path(engine_dir).glob("*.plan")):
        # Checked before minutes of export. A folder already holding engines may be
        # read-only (a deployment's): reusing them writes nothing, and an engine that is
        # missing there is refused, with the same error, before it is built.
        check_output_file(Path(engine_dir) / "engine.plan", "--engine-dir")
    require_tensorrt(family, gpu=False)  # what is missing is said before any work
    exported = open_exported(model, precision)
    options.ranges.check(exported.dims.size_multiple)
    out = Path(engine_dir) if engine_dir else None
    return build_engines(exported, precision, options, out, family=family)


def check(
    model: str | ModelSource,
    backend: str = "onnxruntime",
    precision: str | None = None,
    reference: str | ModelSource | None = None,
    engine_dir: str | Path | None = None,
) -> dict[str, Any]:
    """``sdtrt check``: the backend's networks and one img2img image against PyTorch. The
    precision defaults as everywhere (``default_precision``), so ``build`` then ``check``
    look at the same engines. ``reference``: the PyTorch model to compare with, where the
    folder does not record one (an optimum export). ``engine_dir``: TensorRT engines
    ``build`` wrote there."""
    from sdtrt.bench.check import run_check
    from sdtrt.engine.factory import check_available
    from sdtrt.models import load_components
    from sdtrt.options import backend_options

    engines = None if engine_dir is None else str(engine_dir)
    options = backend_options(backend, precision=precision, engine_dir=engines)
    check_available(options)
    precision = precision or default_precision(backend)
    source = as_source(model)
    if is_onnx_folder(source.model):
        exported = ExportedModel.open_as(source)
        exported.network_precision("unet", precision)  # holds those graphs, or says so
        components = exported.source_components(reference)
    else:
        components = load_components(source)
        exported = open_exported(source, precision, components)
    return run_check(
        exported,
        components,
        backend=backend,
        precision=precision,
        engine_dir=engines,
    )
