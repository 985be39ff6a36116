"""One typed path from a user's options to a backend: the option matrix is decided before
any model is loaded or exported; defaults agree across verbs; a backend's outputs belong
to the caller; the fast schedulers run only on proven diffusers releases."""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys

import pytest
import torch

from sdtrt.cli import main
from sdtrt.engine.trt_build import tensorrt_version
from sdtrt.options import (
    BuildOptions,
    OrtOptions,
    TensorRTOptions,
    TorchOptions,
    backend_options,
    default_precision,
)


class _Reached(Exception):
    """Raised where the work would begin: the options got through the gate."""


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _expected_to_pass(backend, cuda_graphs, dtype, precision, device) -> bool:
    """The rule, written out: which combinations may start work on this machine."""
    has_cuda = torch.cuda.is_available()
    if backend == "torch":
        return (
            precision is None
            and (device == "cuda") >= cuda_graphs
            and (device != "cuda" or has_cuda)
        )
    if dtype is not None:
        return False
    if backend == "onnxruntime":
        return not cuda_graphs and (device != "cuda" or _ort_has_cuda())
    return device != "cpu" and has_cuda and tensorrt_version() is not None


MATRIX = list(
    itertools.product(
        ("torch", "onnxruntime", "tensorrt"),
        (False, True),
        (None, "fp32", "fp16"),
        (None, "fp32", "fp16"),
        (None, "cpu", "cuda"),
    )
)


def test_option_matrix_is_decided_before_any_work(exported, tmp_path, monkeypatch, capsys):
    """Every backend x --cuda-graphs x --dtype x --precision x --device on a pre-exported
    tiny model: exit 2 with one line and no traceback, or on to the work; never a refusal
    after the work began."""

    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr("sdtrt.runtime.pipeline.Img2ImgPipeline.from_pretrained", reached)
    monkeypatch.setattr("sdtrt.models.load_components", reached)
    for backend, cuda_graphs, dtype, precision, device in MATRIX:
        args = ["img2img", "--model", str(exported.root), "--backend", backend]
        args += ["--steps", "2", "--out", str(tmp_path / "o.png")]
        args += ["--cuda-graphs"] * cuda_graphs
        args += ["--dtype", dtype] * (dtype is not None)
        args += ["--precision", precision] * (precision is not None)
        args += ["--device", device] * (device is not None)
        try:
            code = main(args)
        except _Reached:
            code = None
        err = capsys.readouterr().err
        case = " ".join(args[4:])
        if _expected_to_pass(backend, cuda_graphs, dtype, precision, device):
            assert code is None, f"{case}: refused: {err}"
        else:
            assert code == 2, f"{case}: not refused before the work"
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, case
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    "backend, given, message",
    [
        ("onnxruntime", {"cuda_graphs": True}, "--cuda-graphs does not apply to the onnxruntime"),
        ("onnxruntime", {"dtype": "fp16"}, "--dtype does not apply"),
        ("tensorrt", {"dtype": "fp32"}, "--dtype does not apply"),
        ("tensorrt", {"device": "cpu"}, "TensorRT runs on an NVIDIA GPU only"),
        ("torch", {"precision": "fp16"}, "--precision does not apply to the torch"),
        ("torch", {"cuda_graphs": True}, "--cuda-graphs needs --device cuda"),
        ("torch", {"step_graphs": True}, "--step-graphs needs --device cuda"),
        ("onnxruntime", {"step_graphs": True}, "--step-graphs does not apply to the onnxrun"),
        ("tensorrt", {"compile_unet": True}, "--compile does not apply to the tensorrt"),
        ("onnxruntime", {"channels_last": True}, "--channels-last does not apply"),
        ("tensorrt-rtx", {"fuse_qkv": True}, "--fuse-qkv does not apply.*PyTorch UNet"),
        ("torch", {"ort_threads": 2}, "--ort-threads does not apply"),
        ("onnxruntime", {"engine_dir": "."}, "--engine-dir does not apply.*TensorRT engines"),
        ("torch", {"engine_dir": "."}, "--engine-dir does not apply to the torch"),
        (
            "tensorrt-rtx",
            {"engine_dir": "/no/such/engines"},
            "engine folder /no/such/engines "
            "does not exist.*sdtrt build --model MODEL --engine-dir /no/such/engines",
        ),
    ],
)
def test_options_that_do_not_apply_are_named(backend, given, message):
    with pytest.raises(ValueError, match=message):
        backend_options(backend, **given)


def test_one_gpu_of_several_is_picked_with_cuda_visible_devices(capsys):
    """torch's "cuda:1" (diffusers' pipe.to("cuda:1") habit) is answered with how sdtrt
    picks a GPU, on the command line and in Python, before any work."""
    from sdtrt.cli import main

    hint = "for GPU 1 give device cuda with CUDA_VISIBLE_DEVICES=1"
    for backend in ("torch", "onnxruntime"):
        with pytest.raises(ValueError, match=f"device 'cuda:1': sdtrt runs on one GPU.*{hint}"):
            backend_options(backend, device="cuda:1")
    with pytest.raises(SystemExit) as exit_:
        main(["img2img", "--device", "cuda:1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --device: cuda:1: sdtrt runs" in err and hint in err


def test_typed_options_per_backend():
    assert backend_options("torch", dtype="fp16") == TorchOptions(dtype="fp16")
    assert backend_options("onnxruntime") == OrtOptions(precision="fp32")
    assert backend_options("tensorrt", cuda_graphs=True) == TensorRTOptions(
        precision="fp16", cuda_graphs=True
    )
    assert backend_options("tensorrt", step_graphs=True) == TensorRTOptions(step_graphs=True)
    assert backend_options("torch", channels_last=True, compile_unet=True) == TorchOptions(
        channels_last=True, compile_unet=True
    )


def test_ort_cuda_graphs_refused_before_the_export(tmp_path, monkeypatch, capsys):
    """The bug: `--backend onnxruntime --cuda-graphs` exported for 80 s, then a TypeError."""

    def no_export(*args, **kwargs):
        raise AssertionError("exported before refusing")

    monkeypatch.setattr("sdtrt.export.exporter.export_model", no_export)
    monkeypatch.setattr("sdtrt.models.load_components", no_export)
    code = main(
        ["img2img", "--backend", "onnxruntime", "--cuda-graphs", "--out", str(tmp_path / "o.png")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--cuda-graphs does not apply" in err and "Traceback" not in err


def test_build_and_check_default_to_the_same_engines(exported_fp16, monkeypatch, capsys):
    """`sdtrt build` then `sdtrt check --backend tensorrt` look for the same precision."""
    from sdtrt.cli import build_parser

    build_args = build_parser().parse_args(["build", "--model", "x"])
    seen = {}

    def fake_check(exported, components, *, backend, precision, engine_dir):
        seen["precision"] = precision
        raise _Reached

    monkeypatch.setattr("sdtrt.engine.factory.check_available", lambda options: None)
    monkeypatch.setattr("sdtrt.bench.check.run_check", fake_check)
    monkeypatch.setattr(
        "sdtrt.export.folder.ExportedModel.source_components", lambda self, reference: {}
    )
    with pytest.raises(_Reached):
        main(["check", "--model", str(exported_fp16.root), "--backend", "tensorrt"])
    assert seen["precision"] == build_args.precision == default_precision("tensorrt") == "fp16"
    assert BuildOptions().flags()["optimization_level"] == build_args.optimization_level


def test_engine_dir_reaches_the_tensorrt_backend(exported, tiny, onnx_cache, tmp_path, monkeypatch):
    """`sdtrt build --engine-dir D`, then every command that runs engines takes D: the
    backend gets it and builds nothing there (a folder the user names is theirs to build);
    without it, the cache's engines are built when missing."""
    from sdtrt.bench.config import BenchConfig
    from sdtrt.engine.factory import backend_from_components
    from sdtrt.options import CacheOptions

    seen = []

    def reached(*args, **kwargs):
        seen.append(args + tuple(kwargs.values()))
        raise _Reached

    monkeypatch.setattr("sdtrt.engine.factory.check_available", lambda options: None)
    monkeypatch.setattr("sdtrt.engine.trt_backend.TensorRTBackend", reached)
    engines = tmp_path / "engines"
    engines.mkdir()
    cache = CacheOptions(cache_dir=str(onnx_cache), source="tiny")
    for engine_dir, build_missing in ((None, True), (str(engines), False)):
        with pytest.raises(_Reached):
            options = TensorRTOptions(precision="fp32", engine_dir=engine_dir)
            backend_from_components(tiny, options, cache)
        _, got = seen.pop()
        assert got.engine_dir == engine_dir and got.build_missing is build_missing
    model = ["--model", str(exported.root), "--backend", "tensorrt", "--precision", "fp32"]
    model += ["--engine-dir", str(engines)]
    with pytest.raises(_Reached):
        main(["img2img", *model, "--out", str(tmp_path / "o.png")])
    assert seen.pop()[1] == TensorRTOptions(precision="fp32", engine_dir=str(engines))
    monkeypatch.setattr("sdtrt.serve.server.run", reached)
    with pytest.raises(_Reached):
        main(["serve", *model])
    assert seen.pop()[1] == TensorRTOptions(precision="fp32", engine_dir=str(engines))
    monkeypatch.setattr("sdtrt.bench.check.run_check", reached)
    with pytest.raises(_Reached):
        main(["check", *model])
    assert seen.pop()[-1] == str(engines)
    monkeypatch.setattr("sdtrt.bench.benchmark.run_bench", reached)
    bench = ["bench", "--model", str(exported.root), "--backends", "tensorrt,onnxruntime"]
    with pytest.raises(_Reached):
        main([*bench, "--engine-dir", str(engines)])
    assert seen.pop()[0].options_for("tensorrt").engine_dir == str(engines)
    with pytest.raises(ValueError, match="--engine-dir applies to the TensorRT backends' rows"):
        BenchConfig(backends=("torch",), engine_dir=str(engines))


def _outputs(backend, tiny_dims_inputs):
    sample, t, hidden, ids, image, latents = tiny_dims_inputs
    return {
        "encode_text": lambda x: backend.encode_text(x),
        "unet": lambda x: backend.unet(x, t, hidden),
        "encode_image": lambda x: backend.encode_image(x),
        "decode_latents": lambda x: backend.decode_latents(x),
    }, {"encode_text": ids, "unet": sample, "encode_image": image, "decode_latents": latents}


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_outputs_belong_to_the_caller(name, tiny, exported):
    """Call every network twice: the first result must be unchanged by the second (PNDM
    keeps model outputs across steps)."""
    import copy

    from sdtrt.engine.factory import backend_from_components, backend_from_exported

    if name == "torch":
        backend = backend_from_components(copy.deepcopy(tiny), TorchOptions())
    else:
        backend = backend_from_exported(exported, OrtOptions())
    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(2, 4, 4, 4, generator=g),
        torch.tensor(500.0),
        torch.randn(2, 77, 32, generator=g),
        torch.randint(0, 1000, (1, 77), generator=g),
        torch.rand(1, 3, 32, 32, generator=g) * 2 - 1,
        torch.randn(1, 4, 4, 4, generator=g),
    )
    calls, first_inputs = _outputs(backend, inputs)
    for network, call in calls.items():
        first = call(first_inputs[network])
        kept = first.clone()
        other = first_inputs[network]
        other = torch.randint_like(other, 0, 1000) if other.dtype == torch.int64 else other + 1
        second = call(other)
        assert not torch.equal(second, kept), network  # the inputs did change the output
        assert torch.equal(first, kept), f"{name}.{network}: the second call changed the first"
        assert first.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tensorrt_outputs_are_copies_of_its_buffers(dtype):
    """The TensorRT backend's hand-out, on CPU: a float32 tensor that shares no memory with
    the engine's buffer, whatever the engine's dtype (``.float()`` of an fp32 buffer is the
    buffer itself: the bug)."""
    from sdtrt.engine.trt_backend import owned

    buffer = torch.arange(12, dtype=dtype)
    out = owned(buffer[:6].view(2, 3))
    buffer.fill_(-1)
    assert out.dtype == torch.float32 and out.flatten().tolist() == list(range(6))


def test_every_scheduler_is_made_from_a_built_in_models_config_without_warnings(tiny):
    """The built-in models' scheduler config (PNDM's settings, no class name): diffusers'
    from_config warns that LCM and TCD do not take skip_prk_steps, on every request;
    sdtrt leaves out what a class does not take, and the scheduler is the same."""
    import diffusers
    import diffusers.utils.logging as diffusers_logging

    from sdtrt.runtime import schedulers

    # As built in code (saving the model, as other tests do, records a class name in it,
    # and from_config then drops PNDM's settings silently).
    config = {k: v for k, v in tiny["scheduler"].config.items() if k != "_class_name"}
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    diffusers_logger = logging.getLogger("diffusers")  # its own handler; it does not propagate
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()  # sdtrt's loaders quiet it while they load
    diffusers_logger.addHandler(handler)
    try:
        made = {name: schedulers.make_scheduler(name, config) for name in schedulers.SCHEDULERS}
        ours = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
        own = diffusers.LCMScheduler.from_config(config)
    finally:
        diffusers_logger.removeHandler(handler)
        diffusers_logging.set_verbosity(level)
    assert ours == []
    says = "{'skip_prk_steps': True} were passed to LCMScheduler, but are not expected"
    assert any(says in r.getMessage() for r in records)
    # The same settings; diffusers' config keeps the key it ignored.
    kept = {k: v for k, v in own.config.items() if k != "skip_prk_steps"}
    assert dict(made["lcm"].config) == kept


def test_fast_schedulers_only_on_proven_diffusers(monkeypatch, caplog):
    import diffusers

    from sdtrt.runtime import schedulers
    from sdtrt.runtime.fast_schedulers import FAST_SCHEDULERS

    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    monkeypatch.setattr(schedulers, "PROVEN_DIFFUSERS", (diffusers.__version__,))
    for name, class_name in schedulers.SCHEDULERS.items():  # each name's memoised class
        fast = type(schedulers.make_scheduler(name, config))
        assert fast is FAST_SCHEDULERS[class_name] and issubclass(
            fast, getattr(diffusers, class_name)
        )
    monkeypatch.setattr(schedulers, "PROVEN_DIFFUSERS", ("0.0.0",))
    monkeypatch.setattr(schedulers, "_warned", [])
    with caplog.at_level(logging.INFO, logger="sdtrt.runtime.schedulers"):
        plain = schedulers.make_scheduler("lms", config)
    assert type(plain) is diffusers.LMSDiscreteScheduler
    assert "not one the fast schedulers were proven on" in caplog.text


def test_bench_and_options_do_not_import_the_cli_or_torch():
    code = (
        "import sys, sdtrt.options, sdtrt.bench.config; "
        "print('torch' in sys.modules, 'sdtrt.cli' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    code = "import sys, sdtrt.bench.benchmark; print('sdtrt.cli' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]


def test_from_pretrained_takes_a_diffusers_folder(tiny, tmp_path, images):
    """What a diffusers user expects: from_pretrained on a diffusers folder runs it on torch."""
    from conftest import save_diffusers_folder

    from sdtrt.models import load_components
    from sdtrt.runtime.pipeline import Img2ImgPipeline

    save_diffusers_folder(tiny, tmp_path / "sd")
    pipe = Img2ImgPipeline.from_pretrained(tmp_path / "sd", show_progress=False)
    loaded = load_components(str(tmp_path / "sd"))
    reference = Img2ImgPipeline.from_components(loaded, show_progress=False)
    run = dict(num_inference_steps=3, output_type="np")
    got = pipe("a", images[0], generator=torch.Generator().manual_seed(1), **run).images
    want = reference("a", images[0], generator=torch.Generator().manual_seed(1), **run).images
    assert pipe.backend.name == "torch" and float(abs(got - want).max()) == 0.0
