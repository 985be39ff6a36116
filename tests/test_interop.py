"""The Hugging Face ONNX layout with a real client: optimum-onnx loads what `sdtrt export`
writes, and its img2img equals sdtrt's. optimum needs transformers < 4.58, so it runs from
its own venv (`make` builds .venv-optimum); without it these tests skip and say so."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from interop.settings import CALL, PROMPT, SEED

from sdtrt.cli import main
from sdtrt.errors import InvalidInputError
from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.source import ModelSource

ROOT = Path(__file__).parent.parent
OPTIMUM_PYTHON = Path(os.environ.get("SDTRT_OPTIMUM_PYTHON", ROOT / ".venv-optimum/bin/python"))
SCRIPT = Path(__file__).parent / "interop" / "optimum_img2img.py"
pytestmark = pytest.mark.skipif(
    not OPTIMUM_PYTHON.exists(),
    reason=f"no optimum venv at {OPTIMUM_PYTHON} (make builds it; or set SDTRT_OPTIMUM_PYTHON)",
)


def _optimum_and_ours(folder, tmp_path, ours, theirs):
    """optimum's img2img on an exported folder (in its venv) and sdtrt's on the same folder:
    both images, and the VAE scaling factor optimum read."""
    rng = np.random.default_rng(0)
    image = tmp_path / "in.png"
    PIL.Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "optimum.npy"
    run = subprocess.run(
        [str(OPTIMUM_PYTHON), str(SCRIPT), str(folder), str(image), theirs, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    pipe = Img2ImgPipeline.from_pretrained(folder, scheduler=ours, show_progress=False)
    got = pipe(
        PROMPT,
        PIL.Image.open(image).convert("RGB"),
        generator=torch.Generator().manual_seed(SEED),
        **CALL,
    ).images
    return np.load(out), got, float(run.stdout.split()[-1])


@pytest.mark.parametrize(
    "ours, theirs",
    [("lms", "LMSDiscreteScheduler"), ("euler_a", "EulerAncestralDiscreteScheduler")],
)
def test_optimum_runs_our_export_and_agrees(exported, tiny, tmp_path, ours, theirs):
    theirs_images, got, scaling = _optimum_and_ours(exported.root, tmp_path, ours, theirs)
    # optimum read the VAE's scaling factor from our config.json, not its 2^(blocks-1) guess
    assert scaling == pytest.approx(tiny["vae"].config.scaling_factor)  # not SD's 0.18215
    assert theirs_images.shape == got.shape == (1, 32, 48, 3)
    # measured: 2.1e-5 on the trained tiny (under 1e-5 on random weights)
    assert float(np.abs(theirs_images - got).max()) <= 1e-4


def test_optimum_runs_an_export_with_taesd_and_agrees(taesd_exported, tmp_path):
    """With TAESD as the VAE the encoder graph gives the latents (``latents``, no
    distribution): optimum reads them as diffusers does (no draw) and agrees."""
    theirs_images, got, scaling = _optimum_and_ours(
        taesd_exported.root, tmp_path, "lms", "LMSDiscreteScheduler"
    )
    assert scaling == 1.0  # TAESD's
    assert theirs_images.shape == got.shape == (1, 32, 48, 3)
    assert float(np.abs(theirs_images - got).max()) <= 2e-4  # measured: 5.5e-5


def test_transformers_4_reads_an_exports_embedding_tokens_as_we_do(tmp_path, fast_export):
    """An export made with a three-vector embedding ("Shiny"): transformers 4.57's
    CLIPTokenizer (optimum's) reads its tokens, and diffusers' expansion there (which
    transformers 4 lets find "Shiny") gives the ids sdtrt's own expansion gives."""
    from safetensors.torch import save_file

    from sdtrt import api
    from sdtrt.export.folder import ExportedModel
    from sdtrt.options import ExportOptions
    from sdtrt.runtime.steps import token_ids
    from sdtrt.source import ModelSource

    save_file({"emb_params": torch.randn(3, 32)}, tmp_path / "Shiny.safetensors")
    source = ModelSource("tiny", embeddings=(str(tmp_path / "Shiny.safetensors"),))
    out = tmp_path / "export"
    api.export(source, out, ExportOptions(precisions=("fp32",)), show_progress=False)
    prompt = "a Shiny red circle, Shiny"
    script = (
        "import sys, json\n"
        "from transformers import CLIPTokenizer\n"
        "from diffusers.loaders.textual_inversion import TextualInversionLoaderMixin as T\n"
        "t = CLIPTokenizer.from_pretrained(sys.argv[1])\n"
        "text = T._maybe_convert_prompt(None, sys.argv[2], t)\n"
        "print(json.dumps(t(text, padding='max_length', max_length=77).input_ids))\n"
    )
    run = subprocess.run(
        [str(OPTIMUM_PYTHON), "-c", script, str(out / "tokenizer"), prompt],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    tokenizer = ExportedModel.open(out).tokenizer()
    ours = token_ids(tokenizer, [prompt])[0].tolist()
    assert ours == theirs
    shiny = tokenizer.convert_tokens_to_ids(["Shiny", "Shiny_1", "Shiny_2"])
    assert ours[2:5] == shiny and ours[8:11] == shiny  # both calls, all three vectors


def test_export_writes_both_tokenizer_formats_and_configs(exported, tiny):
    root = exported.root
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer.json"):
        assert (root / "tokenizer" / name).is_file(), name
    # The slow format holds the fast one's BPE model exactly (optimum's transformers 4 reads
    # it: the img2img test above then agrees with ours to 1e-4, same token ids).
    model = json.loads((root / "tokenizer/tokenizer.json").read_text())["model"]
    assert json.loads((root / "tokenizer/vocab.json").read_text()) == model["vocab"]
    merges = (root / "tokenizer/merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version") and merges[1:] == [" ".join(m) for m in model["merges"]]
    assert exported.tokenizer().get_vocab() == model["vocab"]
    for half in ("vae_encoder", "vae_decoder"):
        config = json.loads((root / half / "config.json").read_text())
        assert config["scaling_factor"] == pytest.approx(tiny["vae"].config.scaling_factor)
    assert json.loads((root / "unet/config.json").read_text())["_class_name"] == (
        "UNet2DConditionModel"
    )
    assert json.loads((root / "text_encoder/config.json").read_text())["hidden_size"] == 32


# --- the other way: what optimum exports, sdtrt runs, checks, benches and builds ---------


@pytest.fixture(scope="module")
def optimum_export(tiny, tmp_path_factory):
    """The tiny model exported by optimum-cli (opset 18, int64 token ids, a scalar timestep,
    pooler_output), from a diffusers folder transformers 4 reads."""
    from conftest import save_diffusers_folder

    root = tmp_path_factory.mktemp("optimum")
    save_diffusers_folder(tiny, root / "tiny")
    cli = OPTIMUM_PYTHON.parent / "optimum-cli"
    args = ["export", "onnx", "--model", str(root / "tiny"), "--task", "image-to-image"]
    run = subprocess.run(
        [str(cli), *args, str(root / "onnx")], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return root


def _optimum_img2img(folder, image, scheduler, out):
    run = subprocess.run(
        [str(OPTIMUM_PYTHON), str(SCRIPT), str(folder), str(image), scheduler, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return np.load(out)


@pytest.mark.parametrize(
    "ours, theirs",
    [("lms", "LMSDiscreteScheduler"), ("euler_a", "EulerAncestralDiscreteScheduler")],
)
def test_we_run_an_optimum_export_and_agree_with_optimum(optimum_export, tmp_path, ours, theirs):
    folder = optimum_export / "onnx"
    rng = np.random.default_rng(0)
    image = tmp_path / "in.png"
    PIL.Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(image)
    theirs_images = _optimum_img2img(folder, image, theirs, tmp_path / "optimum.npy")
    pipe = Img2ImgPipeline.from_pretrained(folder, scheduler=ours, show_progress=False)
    got = pipe(
        PROMPT,
        PIL.Image.open(image).convert("RGB"),
        generator=torch.Generator().manual_seed(SEED),
        **CALL,
    ).images
    assert theirs_images.shape == got.shape == (1, 32, 48, 3)
    assert float(np.abs(theirs_images - got).max()) <= 1e-5
    # The folder's scheduler config is optimum's (timestep_spacing "leading", written out):
    # both pipelines step from it alike, or the pictures above would differ.
    assert pipe.scheduler.config.timestep_spacing == "leading"


def test_an_optimum_folder_is_read_through_its_graphs_io(optimum_export, tiny):
    from sdtrt.export.folder import ExportedModel

    exported = ExportedModel.open(optimum_export / "onnx")
    assert exported.adopted and exported.precisions == ("fp32",)
    with pytest.raises(InvalidInputError, match="another tool, which records no clip skip"):
        ExportedModel.open_as(ModelSource(str(optimum_export / "onnx"), clip_skip=1))
    assert exported.dims.size_multiple == 16
    assert exported.scaling_factor == pytest.approx(tiny["vae"].config.scaling_factor)
    text, unet = exported.network("text_encoder", "fp32"), exported.network("unet", "fp32")
    assert text.input_dtype("input_ids", "fp32") == torch.int64
    assert text.output_name == "last_hidden_state"  # pooler_output is there, and unused
    assert "pooler_output" in text.io.outputs
    assert unet.inputs["timestep"] == [] and not unet.per_row_timesteps
    feeds = unet.feeds(
        sample=torch.zeros(4, 4, 2, 3),
        timestep=torch.tensor([801.0] * 4),
        encoder_hidden_states=torch.zeros(4, 77, 32),
    )
    assert feeds["timestep"].shape == () and float(feeds["timestep"]) == 801.0
    with pytest.raises(InvalidInputError, match="one timestep for all rows"):
        unet.feeds(
            sample=torch.zeros(2, 4, 2, 3),
            timestep=torch.tensor([801.0, 901.0]),
            encoder_hidden_states=torch.zeros(2, 77, 32),
        )


def test_cli_runs_checks_and_benches_an_optimum_folder(optimum_export, tmp_path, capsys):
    folder = str(optimum_export / "onnx")
    out = tmp_path / "out.png"
    run = ["img2img", "--model", folder, "--backend", "onnxruntime", "--steps", "4"]
    assert main([*run, "--height", "32", "--width", "48", "--out", str(out), "--no-progress"]) == 0
    with PIL.Image.open(out) as written:
        assert written.size == (48, 32)
    # check needs the PyTorch model: optimum's folder records none
    capsys.readouterr()
    assert main(["check", "--model", folder]) == 2
    assert "--reference" in capsys.readouterr().err
    reference = str(optimum_export / "tiny")
    assert main(["check", "--model", folder, "--reference", reference]) == 0
    assert "PASS" in capsys.readouterr().out
    bench = ["bench", "--model", folder, "--backends", "onnxruntime,torch", "--steps", "2"]
    record = tmp_path / "bench.json"
    small = ["--height", "32", "--width", "32", "--warmup", "0", "--repeats", "1"]
    assert main([*bench, *small, "--json", str(record)]) == 0
    rows = {r["backend"]: r for r in json.loads(record.read_text())["results"]}
    assert rows["onnxruntime"]["status"] == "ok"
    assert rows["torch"]["status"] == "skipped" and "--reference" in rows["torch"]["reason"]


def test_adopt_stores_the_manifest_and_then_guards_the_graphs(optimum_export, tmp_path, capsys):
    from sdtrt.export.folder import MANIFEST, is_export

    folder = tmp_path / "onnx"
    shutil.copytree(optimum_export / "onnx", folder)
    capsys.readouterr()
    assert main(["adopt", str(folder)]) == 0
    assert capsys.readouterr().out.startswith(f"adopted {folder}: fp32 graphs")
    assert is_export(folder) and (folder / MANIFEST).is_file()
    written = (folder / MANIFEST).stat().st_mtime_ns
    assert main(["adopt", str(folder)]) == 0  # again: nothing to do, and it says so
    assert "has its manifest already (fp32 graphs" in capsys.readouterr().out
    assert (folder / MANIFEST).stat().st_mtime_ns == written
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["opset"] == 18 and manifest["source"]["fingerprint"] is None
    assert manifest["graphs"]["unet/model.onnx"]["io"]["inputs"]["timestep"]["shape"] == []
    # a graph changed after adoption is caught by its hash, as in sdtrt's own exports
    unet = folder / "unet" / "model.onnx"
    unet.write_bytes(unet.read_bytes()[:-100])
    capsys.readouterr()
    assert main(["img2img", "--model", str(folder), "--backend", "onnxruntime"]) == 2
    assert "does not match its manifest" in capsys.readouterr().err


def _inpainting_config(folder):
    """The UNet config an optimum export of an inpainting model carries."""
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "in_channels": 9}))


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda f: (f / "vae_decoder" / "config.json").unlink(), "vae_decoder/config.json"),
        (lambda f: shutil.rmtree(f / "text_encoder"), "text_encoder/model.onnx"),
        (lambda f: (f / "unet" / "model.onnx").write_bytes(b"not a graph"), "unet/model.onnx"),
        (_inpainting_config, "is not a model sdtrt runs: its UNet takes 9 input channels"),
    ],
    ids=["no-vae-config", "no-text-encoder", "corrupt-unet", "inpainting-unet"],
)
def test_an_incomplete_or_corrupt_optimum_folder_exits_2_naming_it(
    optimum_export, tmp_path, capsys, damage, named
):
    folder = tmp_path / "onnx"
    shutil.copytree(optimum_export / "onnx", folder)
    damage(folder)
    capsys.readouterr()
    assert main(["img2img", "--model", str(folder), "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None, reason="TensorRT-RTX is not installed"
)
def test_tensorrt_rtx_builds_engines_from_optimum_graphs(optimum_export, tmp_path):
    engines = tmp_path / "engines"
    args = ["build", "--model", str(optimum_export / "onnx"), "--backend", "tensorrt-rtx"]
    small = ["--batch", "1-2", "--height", "32-64", "--width", "32-64", "--precision", "fp32"]
    small += ["--opt-height", "32", "--opt-width", "48"]
    assert main([*args, *small, "--engine-dir", str(engines)]) == 0
    for network in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        (sidecar,) = engines.glob(f"{network}.fp32.rtx*.json")
        profile = json.loads(sidecar.read_text())["profile"]
        if network == "text_encoder":  # int64 ids, dynamic sequence fixed at 77
            assert profile["input_ids"] == {"min": [1, 77], "opt": [1, 77], "max": [2, 77]}
        if network == "unet":  # the scalar timestep is static: not in the profile
            assert set(profile) == {"sample", "encoder_hidden_states"}
