"""Safe by default: nothing that is not ours is deleted, every output is checked before the
work, a request's size is bounded, and what a newcomer meets (help, README snippets, the
console) says what it should."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import onnx
import PIL.Image
import pytest
from conftest import fake_network_export

from sdtrt.cli import main
from sdtrt.options import ExportOptions

README = Path(__file__).parent.parent / "README.md"
FAST = ["--steps", "2", "--height", "32", "--width", "48", "--no-progress"]
UNWRITABLE = Path("/proc/sdtrt-cannot-write-here")  # not even root creates files in /proc


class _WorkStarted(Exception):
    pass


@pytest.fixture
def no_work(monkeypatch):
    """Any model load or export fails the test: refusals must come first."""

    def started(*args, **kwargs):
        raise _WorkStarted

    for target in (
        "sdtrt.models.load_components",
        "sdtrt.export.folder.ExportedModel.open",
        "sdtrt.export.exporter.export_model",
        "sdtrt.runtime.pipeline.Img2ImgPipeline.from_pretrained",
    ):
        monkeypatch.setattr(target, started)


def _run(args, capsys):
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


# Data loss -------------------------------------------------------------------------------


def test_export_never_replaces_a_folder_of_the_users(tmp_path, capsys, no_work):
    target = tmp_path / "p"
    (target / "photos").mkdir(parents=True)
    (target / "notes.txt").write_text("mine")
    (target / "photos" / "a.jpg").write_bytes(b"jpeg")
    code, err = _run(["export", "--model", "tiny", "--out", str(target)], capsys)
    assert code == 2 and "holds files sdtrt did not write" in err and "Traceback" not in err
    assert (target / "notes.txt").read_text() == "mine"
    assert (target / "photos" / "a.jpg").read_bytes() == b"jpeg"


def test_export_into_the_current_folder_is_refused(tmp_path, capsys, monkeypatch, no_work):
    (tmp_path / "keep.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    code, err = _run(["export", "--model", "tiny", "--out", "."], capsys)
    assert code == 2 and "current folder" in err and "Traceback" not in err
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_export_replaces_only_empty_folders_and_exports(tiny, tmp_path, fast_export):
    from sdtrt.errors import InvalidInputError
    from sdtrt.export.exporter import export_model

    options = ExportOptions(precisions=("fp32",))
    empty = tmp_path / "empty"
    empty.mkdir()
    export_model(tiny, empty, source="tiny", options=options, show_progress=False)
    assert (empty / "sdtrt.json").is_file()
    (empty / "unet" / "model.onnx").write_bytes(b"stale")
    export_model(tiny, empty, source="tiny", options=options, show_progress=False)  # ours
    assert onnx.load(str(empty / "unet" / "model.onnx")).graph.name == "unet-fp32"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sdtrt.json").write_text('{"format": "something-else"}')
    with pytest.raises(InvalidInputError, match="did not write"):
        export_model(tiny, theirs, source="tiny", options=options, show_progress=False)
    assert (theirs / "sdtrt.json").read_text() == '{"format": "something-else"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "theirs"]  # no leftovers


def test_sigterm_ends_an_export_through_its_cleanup(tmp_path, capsys, monkeypatch):
    """`kill`, `docker stop`: the half-written export is removed, not left beside its
    destination (the default action kills the process where it stands)."""
    import signal

    def killed_while_writing(network, module, path, **kwargs):
        fake_network_export(network, module, path, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    def not_main(signum, frame):  # a SIGTERM main lets through fails here, not pytest
        raise AssertionError("SIGTERM reached the handler main found")

    monkeypatch.setattr("sdtrt.export.exporter.export_network", killed_while_writing)
    before = signal.signal(signal.SIGTERM, not_main)
    try:
        code, err = _run(["export", "--model", "tiny", "--out", str(tmp_path / "onnx")], capsys)
        assert signal.getsignal(signal.SIGTERM) is not_main  # put back
    finally:
        signal.signal(signal.SIGTERM, before)
    assert code == 128 + signal.SIGTERM and "terminated (SIGTERM)" in err
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_a_killed_writer_are_named_not_deleted(tiny, tmp_path, fast_export, caplog):
    from sdtrt.export.exporter import export_model

    leftover = tmp_path / ".onnx.k1ll3d.partial"
    (leftover / "unet").mkdir(parents=True)
    (leftover / "unet" / "model.onnx").write_bytes(bytes(2_500_000))
    (tmp_path / ".onnx-other.x.partial").mkdir()  # another destination's: not named
    options = ExportOptions(precisions=("fp32",))
    export_model(tiny, tmp_path / "onnx", source="tiny", options=options, show_progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f".onnx.k1ll3d.partial: left by an interrupted write of {tmp_path / 'onnx'} "
        "(2.5 MB); delete it unless another sdtrt process is writing it now"
    ]
    assert (leftover / "unet" / "model.onnx").is_file()


def test_corrupt_cache_entry_names_the_cache_and_how_to_clear_it(tiny, tmp_path, fast_export):
    from sdtrt.errors import GraphIntegrityError
    from sdtrt.export.cache import exported_for
    from sdtrt.options import CacheOptions

    cache = CacheOptions(cache_dir=str(tmp_path))
    exported = exported_for(tiny, precision="fp32", cache=cache)
    (exported.root / "unet" / "model.onnx").write_bytes(b"damaged")
    again = exported_for(tiny, precision="fp32", cache=cache)
    with pytest.raises(GraphIntegrityError, match="export cache: delete it") as info:
        again.graph_path("unet", "fp32")
    assert str(exported.root) in str(info.value)


def test_processes_sharing_the_cache_export_a_model_once(tiny, tmp_path, monkeypatch, caplog):
    """Two exporters of one model into one cache (Ray Serve replicas starting together):
    one exports, the other waits for it and reuses its folder. flock holds between two
    threads' own file handles as between processes."""
    import threading

    from sdtrt.export.cache import exported_for
    from sdtrt.options import CacheOptions

    exporting, calls = threading.Event(), []

    def slow_export(network, *args, **kwargs):
        calls.append(network.name)
        exporting.set()
        time.sleep(0.2)  # long enough for the second exporter to arrive meanwhile
        fake_network_export(network, *args, **kwargs)

    monkeypatch.setattr("sdtrt.export.exporter.export_network", slow_export)
    cache = CacheOptions(cache_dir=str(tmp_path))
    found = {}

    def export(who):
        found[who] = exported_for(tiny, precision="fp32", cache=cache).root

    caplog.set_level("INFO", logger="sdtrt")
    first = threading.Thread(target=export, args=("first",))
    first.start()
    assert exporting.wait(30)
    export("second")  # arrives while the first is exporting
    first.join(30)
    assert found["first"] == found["second"]
    assert sorted(calls) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("waiting for another sdtrt process, exporting into") for m in messages)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # no "leftovers"
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [
        found["first"].name,
        f"{found['first'].name}.lock",
    ]


def test_reusing_a_cached_export_writes_nothing(tiny, tmp_path, fast_export):
    """An export cache baked into a read-only image or volume is reused: a reuse writes
    no lock file, nothing at all."""
    from sdtrt.export.cache import exported_for
    from sdtrt.options import CacheOptions

    cache = CacheOptions(cache_dir=str(tmp_path))
    exported = exported_for(tiny, precision="fp32", cache=cache)
    exported.root.with_name(f"{exported.root.name}.lock").unlink()
    before = {str(p): p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert exported_for(tiny, precision="fp32", cache=cache).root == exported.root
    assert {str(p): p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_what_a_killed_export_left_in_the_cache_is_removed(tiny, tmp_path, fast_export, caplog):
    """An export killed outright (the OOM killer) leaves its temporary folder, gigabytes
    for SD. In the cache every exporter of an entry holds its lock, so the next one knows
    the leftover is nobody's and removes it; beside a folder the user named it is only
    reported (test_leftovers_of_a_killed_writer_are_named_not_deleted)."""
    from sdtrt.export.cache import exported_for
    from sdtrt.options import CacheOptions

    cache = CacheOptions(cache_dir=str(tmp_path))
    entry = exported_for(tiny, precision="fp32", cache=cache).root
    shutil.rmtree(entry)
    leftover = entry.with_name(f".{entry.name}.k1ll3d.partial")
    (leftover / "unet").mkdir(parents=True)
    (leftover / "unet" / "model.onnx").write_bytes(bytes(2_500_000))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert exported_for(tiny, precision="fp32", cache=cache).root == entry
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"removed {leftover.name} (2.5 MB), left by a write of {entry} that was killed"
    ]
    assert sorted(p.name for p in tmp_path.joinpath("onnx").iterdir()) == [
        entry.name,
        f"{entry.name}.lock",
    ]


def test_an_unwritable_cache_is_a_clear_error(tiny, fast_export):
    from sdtrt.errors import InvalidInputError
    from sdtrt.export.cache import exported_for
    from sdtrt.options import CacheOptions

    cache = CacheOptions(cache_dir=str(UNWRITABLE))
    with pytest.raises(
        InvalidInputError, match=r"cannot be written: /proc is not writable.*SDTRT_CACHE"
    ):
        exported_for(tiny, precision="fp32", cache=cache)


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A disk that fills during an export (SD's takes gigabytes): one line, exit 1, and no
    half-written folder or temporary one."""
    import errno

    calls = []

    def fill_the_disk(network, module, path, **kwargs):
        calls.append(network.name)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fake_network_export(network, module, path, **kwargs)

    monkeypatch.setattr("sdtrt.export.exporter.export_network", fill_the_disk)
    code, err = _run(["export", "--model", "tiny", "--out", str(tmp_path / "onnx")], capsys)
    assert code == 1 and len(calls) == 2
    assert err.strip().splitlines()[-1] == (
        "sdtrt: error: No space left on device; nothing half-written was kept: free some "
        "space, or write elsewhere, and run again"
    )
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


# Outputs checked before the work ---------------------------------------------------------


def _outputs(tmp_path):
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    folder = tmp_path / "folder"
    folder.mkdir()
    return {
        "unwritable": (UNWRITABLE / "x.png", "cannot be written"),
        "folder": (folder, "is a folder"),
        "under-a-file": (a_file / "x.png", "which is a file"),
    }


@pytest.mark.parametrize("case", ["unwritable", "folder", "under-a-file"])
def test_every_subcommand_checks_its_outputs_first(tmp_path, capsys, no_work, case):
    path, message = _outputs(tmp_path)[case]
    json_path = path.with_suffix(".json") if case != "folder" else path
    commands = [
        ["img2img", "--out", str(path), *FAST],
        ["check", "--model", "tiny", "--json", str(json_path)],
        ["bench", "--backends", "torch", "--json", str(json_path)],
        ["bench", "--backends", "torch", "--plot", str(path)],
    ]
    if case != "folder":  # a folder is what export writes
        commands.append(["export", "--model", "tiny", "--out", str(path)])
        commands.append(["build", "--model", "tiny", "--engine-dir", str(path)])
    for command in commands:
        start = time.perf_counter()
        code, err = _run(command, capsys)
        assert code == 2, (command, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, command
        assert message in err or "is a file" in err, (command, err)
        assert time.perf_counter() - start < 5, command


def test_export_onto_an_existing_file_is_refused(tmp_path, capsys, no_work):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"keep")
    code, err = _run(["export", "--out", str(target)], capsys)
    assert code == 2 and "is a file" in err and target.read_bytes() == b"keep"


@pytest.mark.parametrize("suffix, format", [(".jpg", "JPEG"), (".webp", "WEBP"), (".PNG", "PNG")])
def test_output_format_follows_the_extension(tmp_path, capsys, suffix, format):
    out = tmp_path / f"result{suffix}"
    code, _ = _run(["img2img", "--out", str(out), *FAST], capsys)
    assert code == 0
    with PIL.Image.open(out) as image:
        assert image.format == format and image.size == (48, 32)


def test_unknown_image_extension_is_refused(tmp_path, capsys, no_work):
    code, err = _run(["img2img", "--out", str(tmp_path / "x.gif"), *FAST], capsys)
    assert code == 2 and "use one of .png, .jpg, .jpeg, .webp" in err


# Bounded work ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--height", "100000", "--width", "100000"], "set SDTRT_MAX_PIXELS to raise it"),
        (["--batch", "1000"], "set SDTRT_MAX_BATCH"),
        (["--steps", "100000"], "set SDTRT_MAX_STEPS"),
        (["--seed", "99999999999999999999999"], "seed must be an integer in [0, 2^64 - 1]"),
        (["--seed", "-1"], "seed must be an integer in [0, 2^64 - 1]"),
    ],
)
def test_requests_past_the_limits_are_refused_up_front(tmp_path, capsys, no_work, extra, message):
    code, err = _run(["img2img", "--out", str(tmp_path / "o.png"), *FAST, *extra], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_limits_follow_the_environment(monkeypatch):
    from sdtrt.errors import InvalidInputError
    from sdtrt.runtime.inputs import Limits

    monkeypatch.setenv("SDTRT_MAX_PIXELS", str(64 * 64))
    limits = Limits.from_env()
    limits.check(steps=10, batch=1, height=64, width=64)
    with pytest.raises(InvalidInputError, match="80x64 pixels \\(5120\\) is over") as info:
        limits.check(steps=10, batch=1, height=64, width=80)
    assert "ask for a smaller height and width" in str(info.value)  # width x height, as PIL
    monkeypatch.setenv("SDTRT_MAX_PIXELS", "lots")
    with pytest.raises(InvalidInputError, match="SDTRT_MAX_PIXELS must be a positive integer"):
        Limits.from_env()


@pytest.mark.parametrize("orientation, turned", [(1, False), (3, False), (6, True), (8, True)])
def test_a_photo_is_turned_by_its_exif_orientation_as_diffusers_turns_it(
    tmp_path, orientation, turned
):
    """Phones store a photo as taken, with an EXIF tag saying how to turn it: the CLI's
    file and the server's upload come out as diffusers' load_image gives them."""
    import numpy as np
    from diffusers.utils import load_image as diffusers_load_image

    from sdtrt.runtime.inputs import load_image
    from sdtrt.serve.app import decode_image

    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:8, :16] = (255, 0, 0)  # a red corner: where it ends up tells the turn
    exif = PIL.Image.Exif()
    exif[0x0112] = orientation  # Orientation
    path = tmp_path / "photo.jpg"
    PIL.Image.fromarray(pixels).save(path, exif=exif, quality=95)
    want = np.asarray(diffusers_load_image(str(path)))
    assert want.shape == ((48, 32, 3) if turned else (32, 48, 3))
    assert np.array_equal(np.asarray(load_image(path)), want)
    assert np.array_equal(np.asarray(decode_image(path.read_bytes())), want)


@pytest.mark.parametrize("suffix", [".png", ".tiff"])
def test_a_16_bit_grayscale_picture_reads_as_its_8_bit_self(tmp_path, suffix):
    """Pillow opens 16-bit grayscale as ``I;16`` and its RGB conversion clips at 255 (all but
    the darkest 1/256 would turn white): the CLI's file and the server's upload scale it."""
    import numpy as np

    from sdtrt.runtime.inputs import load_image
    from sdtrt.serve.app import decode_image

    grey = np.arange(48 * 32).reshape(32, 48) % 256  # every 8-bit level
    path = tmp_path / f"deep{suffix}"
    PIL.Image.fromarray((grey * 257).astype(np.uint16)).save(path)  # 8 -> 16 bits exactly
    with PIL.Image.open(path) as deep:
        assert deep.mode == "I;16"
    want = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
    assert np.array_equal(np.asarray(load_image(path)), want)
    assert np.array_equal(np.asarray(decode_image(path.read_bytes())), want)


def test_a_huge_input_image_is_refused_before_the_model(tmp_path, capsys, no_work, monkeypatch):
    monkeypatch.setenv("SDTRT_MAX_PIXELS", str(32 * 32))
    image = tmp_path / "big.png"
    PIL.Image.new("RGB", (64, 64)).save(image)
    code, err = _run(["img2img", "--image", str(image), "--out", str(tmp_path / "o.png")], capsys)
    assert code == 2 and "64x64 pixels" in err
    # Resized to a size within the limit, the same picture is fine (the model is loaded).
    small = ["--height", "32", "--width", "32", "--out", str(tmp_path / "o.png")]
    with pytest.raises(_WorkStarted):
        _run(["img2img", "--image", str(image), *small], capsys)


# Tracebacks and wrong words --------------------------------------------------------------


def test_check_at_a_precision_the_export_lacks(exported, capsys):
    code, err = _run(["check", "--model", str(exported.root), "--precision", "fp16"], capsys)
    assert code == 2 and "holds fp32 graphs, not fp16" in err and "Traceback" not in err


def test_json_is_strict(tmp_path):
    from sdtrt.fileio import write_json

    write_json(tmp_path / "r.json", {"psnr": float("inf"), "rows": [float("nan"), 1.5]})

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    data = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert data == {"psnr": None, "rows": [None, 1.5]}


def test_type_stubs_are_not_taken_for_tensorrt(tmp_path, monkeypatch):
    """A bare `tensorrt` namespace (what tensorrt-stubs leaves in site-packages) imports
    fine; it is not TensorRT, and the user is told how to install the real one."""
    from sdtrt.engine.trt_build import require_tensorrt, tensorrt_version
    from sdtrt.errors import BackendUnavailableError

    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.pyi").write_text("class Builder: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    __import__("tensorrt")  # the namespace imports...
    assert tensorrt_version() is None  # ...and is not TensorRT
    with pytest.raises(BackendUnavailableError, match="pip install"):
        require_tensorrt()


def test_a_bench_that_measured_nothing_fails(tmp_path, capsys):
    args = ["bench", "--backends", "tensorrt", "--height", "32", "--width", "32"]
    code, err = _run([*args, "--steps", "2", "--warmup", "0", "--repeats", "1"], capsys)
    assert code == 1 and "nothing was measured" in err


# What a newcomer meets -------------------------------------------------------------------


def test_help_shows_defaults_and_version(capsys):
    with pytest.raises(SystemExit):
        main(["img2img", "--help"])
    text = capsys.readouterr().out
    for expected in ("(default: 50)", "(default: 8.0)", "(default: 32)", "out/img2img.png"):
        assert expected in text
    assert "NAME-0.EXT" in text and "the image's, rounded down" in text
    with pytest.raises(SystemExit):
        main(["--version"])
    assert re.fullmatch(r"sdtrt \d+\.\d+\.\d+\n", capsys.readouterr().out)


def test_output_size_follows_the_image(tmp_path, capsys, caplog):
    """One rule for CLI and API (diffusers'): the image's size, rounded down to the unit."""
    image = tmp_path / "wide.png"
    PIL.Image.new("RGB", (300, 100), (200, 30, 30)).save(image)
    out = tmp_path / "o.png"
    with caplog.at_level("INFO", logger="sdtrt.runtime.inputs"):
        code, _ = _run(
            ["img2img", "--image", str(image), "--out", str(out), "--steps", "2"], capsys
        )
    assert code == 0
    with PIL.Image.open(out) as result:
        assert result.size == (296, 96)  # the torch backend's unit: the VAE's 8 px
    assert "300x100 input image is resized to 296x96" in caplog.text


def test_long_prompts_warn_once_in_our_words(tiny, images, capsys, caplog):
    import torch

    from sdtrt.runtime.pipeline import Img2ImgPipeline

    pipe = Img2ImgPipeline.from_components(tiny, show_progress=False)
    with caplog.at_level("WARNING"):
        pipe("word " * 100, images[0], num_inference_steps=2, generator=torch.Generator())
    assert "was truncated" in caplog.text
    assert "indexing errors" not in caplog.text + capsys.readouterr().err


def _readme_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_snippets_run_as_written(tmp_path, monkeypatch):
    snippets = _readme_snippets()
    assert snippets
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDTRT_CACHE", str(tmp_path / "cache"))
    for snippet in snippets:
        exec(compile(snippet, "README.md", "exec"), {"__name__": "readme"})
    assert [p for p in os.listdir(tmp_path) if p.endswith(".png")]
