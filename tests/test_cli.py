"""The command line: bad input exits 2 with one line and writes nothing; good input
writes a PNG of the requested size."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from sdtrt.cli import main
from sdtrt.options import SEED_PROMPT

FAST = ["--steps", "2", "--height", "32", "--width", "48", "--no-progress"]


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "in.png"
    PIL.Image.new("RGB", (40, 30), (10, 200, 30)).save(path)
    return path


def run(args, capsys):
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err


def test_writes_png_of_requested_size(tmp_path, png, capsys):
    out = tmp_path / "o" / "result.png"
    code, _ = run(["img2img", "--image", str(png), "--out", str(out), *FAST], capsys)
    assert code == 0
    with PIL.Image.open(out) as image:
        assert image.size == (48, 32)
    assert not list(out.parent.glob(".*tmp"))  # the temp file was renamed, not left


def test_a_tilde_no_shell_expanded_is_the_home_folder(tmp_path, png, capsys, monkeypatch):
    """ "~/..." quoted (or from a YAML file, a unit file): the home folder, as a shell would
    have it, not a folder named "~" made in the current one."""
    from sdtrt.source import ModelSource

    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    png.rename(home / "in.png")
    code, err = run(["img2img", "--image", "~/in.png", "--out", "~/o/result.png", *FAST], capsys)
    assert code == 0, err
    assert (home / "o" / "result.png").is_file()
    assert list(elsewhere.iterdir()) == []
    source = ModelSource("~/models/sd15", config="~/models/sd15-config")
    assert (source.model, source.config) == (f"{home}/models/sd15", f"{home}/models/sd15-config")
    assert ModelSource("tiny").model == "tiny"


def test_jpeg_and_webp_files_are_written_at_sdtrts_quality(tmp_path, png, capsys):
    """The lossy formats at quality 95 (JPEG) and 90 (WebP), as the server answers them, not
    Pillow's default JPEG quality of 75: the file is the PNG's pixels encoded so."""
    import io

    written = {}
    for suffix in (".png", ".jpg", ".webp"):
        out = tmp_path / f"result{suffix}"
        assert run(["img2img", "--image", str(png), "--out", str(out), *FAST], capsys)[0] == 0
        written[suffix] = out.read_bytes()
    pixels = PIL.Image.open(io.BytesIO(written[".png"]))
    for suffix, kind, quality in ((".jpg", "JPEG", 95), (".webp", "WEBP", 90)):
        want = io.BytesIO()
        pixels.save(want, format=kind, quality=quality)
        assert written[suffix] == want.getvalue(), kind


def test_unet_switches_reach_the_torch_backend(tmp_path, png, capsys, monkeypatch):
    from sdtrt.engine.torch_backend import TorchBackend

    given = []
    tuned = TorchBackend._tuned
    monkeypatch.setattr(
        TorchBackend, "_tuned", staticmethod(lambda unet, o: given.append(o) or tuned(unet, o))
    )
    out = tmp_path / "s.png"
    args = ["img2img", "--image", str(png), "--out", str(out), *FAST]
    code, _ = run([*args, "--channels-last", "--fuse-qkv"], capsys)
    assert code == 0 and out.exists()
    [options] = given
    assert options.channels_last and options.fuse_qkv and not options.compile_unet


def test_batch_writes_one_file_per_image(tmp_path, png, capsys):
    out = tmp_path / "b.png"
    args = ["img2img", "--image", str(png), "--out", str(out), "--batch", "2", *FAST]
    assert run(args, capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.glob("b-*.png")) == ["b-0.png", "b-1.png"]


def test_eta_reaches_ddims_steps(tmp_path, png, capsys):
    """--eta is the Python call's eta: the same image for the same seed, another at eta 0."""
    import numpy as np
    import torch

    from sdtrt.runtime.pipeline import Img2ImgPipeline

    def cli(eta):
        out = tmp_path / f"eta-{eta}.png"
        args = ["img2img", "--image", str(png), "--scheduler", "ddim", "--steps", "6"]
        assert run([*args, "--eta", eta, "--out", str(out), *FAST[2:]], capsys)[0] == 0
        return np.asarray(PIL.Image.open(out))

    pipe = Img2ImgPipeline.from_pretrained("tiny", scheduler="ddim", show_progress=False)
    with PIL.Image.open(png) as image:
        seed = torch.Generator().manual_seed(32)
        want = pipe("A colorful dancer, nat geo photo", image, strength=0.8, height=32, width=48,
                    num_inference_steps=6, eta=0.7, generator=seed)  # fmt: skip
    got = cli("0.7")
    assert np.array_equal(got, np.asarray(want.images[0]))
    assert np.abs(got.astype(int) - cli("0")).max() > 2


def _bad_files(tmp_path, png):
    text = tmp_path / "text.png"
    text.write_text("not an image")
    truncated = tmp_path / "truncated.png"
    PIL.Image.new("RGB", (64, 64)).save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:60])
    return {
        "missing": (tmp_path / "nope.png", "does not exist"),
        "directory": (tmp_path, "is a directory"),
        "unreadable": (text, "cannot read"),
        "truncated": (truncated, "cannot read"),
        "url": ("https://example.com/in.png", "reads local image files and downloads nothing"),
        "empty": ("", "--image is empty"),  # an unset "$IMAGE": not the sample picture
    }


@pytest.mark.parametrize(
    "case", ["missing", "directory", "unreadable", "truncated", "url", "empty"]
)
def test_bad_image_files(tmp_path, png, capsys, case):
    path, message = _bad_files(tmp_path, png)[case]
    out = tmp_path / "out.png"
    code, err = run(["img2img", "--image", str(path), "--out", str(out), *FAST], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--strength", "0"], "strength must be in (0, 1]"),
        (["--strength", "1.01"], "strength must be in (0, 1]"),
        (["--start-step", "2"], "start step must be an integer in [0, 2)"),
        (["--start-step", "-1"], "start step must be an integer in [0, 2)"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--guidance", "nan"], "guidance scale must be a finite number"),
        (["--guidance", "inf"], "guidance scale must be a finite number"),
        (["--height", "30"], "height 30 is not a multiple of 8"),
        (["--width", "0"], "width must be a positive integer"),
        (["--strength", "0.5", "--start-step", "1"], "not allowed with argument"),
        (["--scheduler", "heun"], "invalid choice: 'heun'"),
        (["--backend", "jax"], "invalid choice: 'jax'"),
        (["--model", "sd99"], "unknown model 'sd99': expected one of tiny, tiny-random"),
        (["--batch", "0"], "batch must be >= 1"),
        (["--model", ""], "the model is empty"),  # an unset "$MODEL": not the current folder
        (
            ["--model", "runwayml/stable-diffusion-v1-5"],  # a Hub id: nothing is downloaded
            "not in the Hugging Face cache: fetch it first (hf download runwayml/stable-diff",
        ),
        (["--eta", "1.5"], "eta must be a number in [0, 1] (DDIM's noise, TCD's gamma), got 1.5"),
        (["--backend", "onnxruntime", "--fuse-qkv"], "--fuse-qkv does not apply to the onnx"),
        (["--backend", "onnxruntime", "--step-graphs"], "--step-graphs does not apply to the"),
        (["--step-graphs"], "--step-graphs needs --device cuda"),
        (["--engine-dir", "."], "--engine-dir does not apply to the torch backend"),
        (["--timesteps", "999,8.5"], "--timesteps: expected integers separated by commas"),
        (["--sigmas", "1,x"], "--sigmas: expected numbers separated by commas (999,850,736)"),
        (["--timesteps", "999", "--sigmas", "1,0"], "not allowed with argument --timesteps"),
        (["--timesteps", "999,500"], "LMSDiscreteScheduler takes no custom timesteps; the sch"),
        (["--guidance-cutoff", "1.5"], "guidance cutoff must be a number in [0, 1], the share o"),
        (["--guidance-cutoff", "-0.1"], "guidance cutoff must be a number in [0, 1]"),
    ],
)
def test_bad_arguments(tmp_path, png, capsys, extra, message):
    out = tmp_path / "out.png"
    # extra comes last so it overrides FAST's values.
    code, err = run(["img2img", "--image", str(png), "--out", str(out), *FAST, *extra], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_fp16_on_the_cpu_warns_that_it_is_slow(tmp_path, png, capfd, caplog):
    """capfd: diffusers' handler writes to the stderr there was when it was made."""
    capsys = capfd
    out = tmp_path / "fp16.png"
    args = ["img2img", "--image", str(png), "--out", str(out), *FAST]
    code, err = run([*args, "--dtype", "fp16"], capsys)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert code == 0 and warnings == [  # not diffusers' on casting with none to keep in fp32
        "fp16 on the CPU runs many times slower than fp32 (PyTorch's CPU kernels are fp32's): "
        "use it to check fp16 numbers, fp32 for speed"
    ]
    assert "should be kept in float32" not in err
    caplog.clear()
    assert run(args, capsys)[0] == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_missing_folder_under_a_local_one_is_not_taken_for_a_hub_id(
    tmp_path, capsys, monkeypatch
):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    code, err = run(["img2img", "--model", "models/sd15", "--out", "o.png", *FAST], capsys)
    assert code == 2 and "unknown model 'models/sd15'" in err and "Hub" not in err
    code, err = run(["img2img", "--model", "someone/sd15", "--out", "o.png", *FAST], capsys)
    assert code == 2 and "hf download someone/sd15" in err


def test_a_custom_schedule_runs_its_own_steps(tmp_path, png, capsys):
    """--timesteps and --sigmas in place of --steps: the schedule's steps, cut by the
    strength (Align Your Steps' 10 for SD 1.5, strength 0.6: 6 UNet calls)."""
    ays = "999,850,736,645,545,455,343,233,124,24"
    sigmas = "14.615,6.475,3.861,2.697,1.886,1.396,0.963,0.652,0.399,0.152,0.0"
    for option, values in (("--timesteps", ays), ("--sigmas", sigmas)):
        out = tmp_path / f"{option[2:]}.png"
        args = ["img2img", "--image", str(png), "--out", str(out), *FAST, "--scheduler", "euler"]
        assert main([*args, "--strength", "0.6", option, values]) == 0
        assert PIL.Image.open(out).size == (48, 32)
        assert "6 UNet calls" in capsys.readouterr().out


def test_a_guidance_cutoff_is_the_pipelines_image_with_the_cutoff_callback(tmp_path, png, tiny):
    """--guidance-cutoff 0.5, a batch of two: the image the Python call makes with
    GuidanceCutoffCallback(cutoff_step_ratio=0.5), pixel for pixel; and not the guided one."""
    from sdtrt.runtime.guidance import GuidanceCutoffCallback
    from sdtrt.runtime.pipeline import Img2ImgPipeline

    out = tmp_path / "cut.png"
    args = ["img2img", "--image", str(png), "--out", str(out), "--steps", "8", "--batch", "2"]
    assert main([*args, "--height", "32", "--width", "48", "--guidance-cutoff", "0.5"]) == 0
    pipe = Img2ImgPipeline.from_components(tiny, show_progress=False)
    kwargs = dict(num_inference_steps=8, num_images_per_prompt=2, height=32, width=48)
    kwargs["generator"] = torch.Generator().manual_seed(32)
    callback = GuidanceCutoffCallback(cutoff_step_ratio=0.5)
    cut = pipe(SEED_PROMPT, PIL.Image.open(png), callback_on_step_end=callback, **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(32)
    guided = pipe(SEED_PROMPT, PIL.Image.open(png), **kwargs)
    for i in range(2):
        written = np.asarray(PIL.Image.open(tmp_path / f"cut-{i}.png"))
        assert np.array_equal(written, np.asarray(cut.images[i]))
        assert not np.array_equal(written, np.asarray(guided.images[i]))
