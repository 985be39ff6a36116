"""The TensorRT logic that needs no GPU: profiles, shape refusal, engine keys and sidecars,
the build lock and atomic write, and the messages when TensorRT or CUDA is missing."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sdtrt.cli import main
from sdtrt.engine.trt_build import tensorrt_version
from sdtrt.engine.trt_cache import EngineKey, cached_engine, find_engine, mismatches
from sdtrt.engine.trt_profile import (
    check_pixels,
    check_request,
    fill_rows,
    max_rows,
    network_profile,
    padded_shapes,
    pixel_range,
    profile_to_json,
)
from sdtrt.errors import EngineMismatchError, InvalidInputError, ShapeOutsideProfileError
from sdtrt.export.networks import ModelDims, networks_for
from sdtrt.options import BuildRanges

SD15 = ModelDims(text_hidden_size=768, latent_channels=4, vae_scale_factor=8, unet_factor=8)
NETS = networks_for(SD15)
KEY = EngineKey(
    network="unet",
    graph_sha256="a" * 64,
    precision="fp16",
    tensorrt_version="10.13.0",
    gpu_name="NVIDIA H100 80GB HBM3",
    compute_capability="9.0",
    profile={"sample": {"min": [2, 4, 32, 32], "opt": [2, 4, 64, 64], "max": [8, 4, 96, 96]}},
    build_flags={"optimization_level": 3, "workspace_gb": None},
)


def test_unet_profile_is_2b_and_latent_sized():
    """Rows: 2B at opt and max (cond and uncond per image), B at min (one image without
    guidance makes one row)."""
    profile = network_profile(NETS["unet"], BuildRanges())
    assert profile["sample"] == {
        "min": (1, 4, 32, 32),
        "opt": (2, 4, 64, 64),
        "max": (8, 4, 96, 96),
    }
    assert profile["encoder_hidden_states"]["min"] == (1, 77, 768)
    assert profile["encoder_hidden_states"]["max"] == (8, 77, 768)
    assert profile["timestep"] == {"min": (1,), "opt": (2,), "max": (8,)}  # one per row
    check_request("unet", profile_to_json(profile), {"sample": (1, 4, 32, 32), "timestep": (1,)})
    wider = network_profile(NETS["unet"], BuildRanges(batch=(2, 4), opt_batch=2))
    assert wider["sample"]["min"][0] == 2 and wider["sample"]["max"][0] == 8


def test_other_networks_profiles():
    ranges = BuildRanges(batch=(1, 2), height=(256, 512), width=(384, 768), opt_width=512)
    assert network_profile(NETS["text_encoder"], ranges)["input_ids"] == {
        "min": (1, 77),
        "opt": (1, 77),
        "max": (2, 77),
    }
    assert network_profile(NETS["vae_encoder"], ranges)["sample"]["max"] == (2, 3, 512, 768)
    assert network_profile(NETS["vae_decoder"], ranges)["latent_sample"]["min"] == (1, 4, 32, 48)


def test_rows_per_call_come_from_the_profiles():
    """A server chunks its text and VAE batches by the images bound and its UNet batches by
    the 2B one: the profiles of one build, read as the engine's sidecar stores them."""
    ranges = BuildRanges(batch=(1, 3), opt_batch=2)
    stored = {n: profile_to_json(network_profile(NETS[n], ranges)) for n in NETS}
    assert max_rows(stored["unet"]) == 6
    assert [max_rows(stored[n]) for n in ("text_encoder", "vae_encoder", "vae_decoder")] == [3] * 3


def test_the_sizes_engines_take_are_what_their_profiles_share():
    """Pixels from each network's axes (latents x 8); engines from two builds: the sizes
    both take. The text encoder has no spatial axis."""
    wide = BuildRanges(height=(256, 768), width=(384, 1024), opt_width=512)
    narrow = BuildRanges(height=(512, 1024), width=(256, 768), opt_height=512)

    def stored(name, ranges):
        return NETS[name], profile_to_json(network_profile(NETS[name], ranges))

    one_build = [stored(n, wide) for n in NETS]
    assert pixel_range(one_build) == ((256, 768), (384, 1024))
    two_builds = [stored("unet", wide), stored("vae_encoder", narrow), stored("vae_decoder", wide)]
    assert pixel_range(two_builds) == ((512, 768), (384, 768))
    assert pixel_range([stored("text_encoder", wide)]) is None
    check_pixels(512, 768, pixel_range(two_builds))
    with pytest.raises(ShapeOutsideProfileError, match="heights 512-768 and widths 384-768 px"):
        check_pixels(256, 512, pixel_range(two_builds))
    check_pixels(64, 4096, None)  # no engine: no bound here
    apart = [
        stored("unet", wide),
        stored("vae_encoder", BuildRanges(height=(1024, 1024), opt_height=1024)),
    ]
    with pytest.raises(ShapeOutsideProfileError, match="take no size in common"):
        check_pixels(512, 512, pixel_range(apart))


def test_static_profile_is_one_shape():
    profile = network_profile(NETS["unet"], BuildRanges(static=True, opt_batch=2))
    assert profile["sample"]["min"] == profile["sample"]["opt"] == profile["sample"]["max"]
    assert profile["sample"]["opt"] == (4, 4, 64, 64)


def test_a_call_of_fewer_rows_than_a_static_engine_takes_is_padded_to_them():
    """A static engine for 2 images takes 4 UNet rows and 2 text or VAE rows, no fewer: a
    call of fewer is raised to them (batched inputs only: a timestep per row is one), one
    that fits is left as it is, and one past the profile is still refused."""
    static = BuildRanges(batch=(2, 2), static=True)
    unet = profile_to_json(network_profile(NETS["unet"], static))
    one_row = {"sample": (1, 4, 64, 64), "timestep": (1,), "encoder_hidden_states": (1, 77, 768)}
    rows, shapes = padded_shapes(NETS["unet"], unet, one_row)
    assert rows == 1
    assert shapes == {
        "sample": (4, 4, 64, 64),
        "timestep": (4,),
        "encoder_hidden_states": (4, 77, 768),
    }
    check_request("unet", unet, shapes)
    four = {k: (4, *v[1:]) for k, v in one_row.items()}
    assert padded_shapes(NETS["unet"], unet, four) is None
    text = profile_to_json(network_profile(NETS["text_encoder"], static))
    assert padded_shapes(NETS["text_encoder"], text, {"input_ids": (1, 77)}) == (
        1,
        {"input_ids": (2, 77)},
    )
    dynamic = profile_to_json(network_profile(NETS["unet"], BuildRanges()))
    assert padded_shapes(NETS["unet"], dynamic, one_row) is None  # its least is one row
    with pytest.raises(ShapeOutsideProfileError, match="outside the engine's profile"):
        check_request("unet", unet, {k: (6, *v[1:]) for k, v in one_row.items()})


def test_padding_rows_are_copies_of_the_calls_last():
    buffer = torch.full((4, 3), float("nan"))
    call = torch.arange(6.0).reshape(2, 3)
    fill_rows(buffer, call)
    assert torch.equal(buffer, torch.stack([call[0], call[1], call[1], call[1]]))
    same = torch.empty(2, 3)
    fill_rows(same, call)
    assert torch.equal(same, call)
    scalar = torch.empty(())
    fill_rows(scalar, torch.tensor(7.0))
    assert float(scalar) == 7.0


def test_the_tuned_shape_defaults_into_the_range():
    """Batch 1 and 512 px, or the range's nearest end: `--static --height 256` is a 256 px
    engine (it was 512 px), `--batch 2-4` tunes at 2 (it asked for --opt-batch)."""
    static = network_profile(NETS["unet"], BuildRanges(height=(256, 256), static=True))
    assert static["sample"]["min"] == static["sample"]["max"] == (2, 4, 32, 64)
    wider = BuildRanges(batch=(2, 4), height=(576, 768), width=(128, 256))
    assert wider.opt() == (2, 576, 256)
    assert network_profile(NETS["unet"], wider)["sample"]["opt"] == (4, 4, 72, 32)
    assert BuildRanges().opt() == (1, 512, 512)
    assert BuildRanges(opt_height=768).opt() == (1, 768, 512)


@pytest.mark.parametrize(
    "ranges, message",
    [
        (BuildRanges(height=(250, 768)), "height 250 is not a multiple of 64"),
        (BuildRanges(opt_batch=5), "opt batch 5 is outside its range 1-4"),
        (BuildRanges(batch=(3, 2), opt_batch=2), "batch range 3-2"),
    ],
)
def test_bad_ranges(ranges, message):
    with pytest.raises(InvalidInputError, match=message):
        network_profile(NETS["unet"], ranges)


def test_request_outside_profile_is_refused_with_the_range():
    profile = {"sample": {"min": [2, 4, 32, 32], "max": [8, 4, 96, 96]}}
    check_request("unet", profile, {"sample": (4, 4, 64, 64), "timestep": (4,)})
    with pytest.raises(ShapeOutsideProfileError, match=r"\(2, 4, 32, 32\) to \(8, 4, 96, 96\)"):
        check_request("unet", profile, {"sample": (2, 4, 128, 64)})
    with pytest.raises(ShapeOutsideProfileError, match="the UNet's batch is 2B"):
        check_request("unet", profile, {"sample": (1, 4, 64, 64)})


@pytest.mark.parametrize("field", list(KEY.to_json()))
def test_every_key_field_changes_the_digest_and_is_named(field):
    value = KEY.to_json()[field]
    other = replace(KEY, **{field: {"x": 1} if isinstance(value, dict) else f"{value}-other"})
    assert other.digest() != KEY.digest()
    assert mismatches(KEY.to_json(), other, tuple(KEY.to_json())) == [
        f"{field}: engine has {value!r}, needed {other.to_json()[field]!r}"
    ]


def test_stem_names_what_the_engine_is_for():
    stem = KEY.stem()
    assert stem.startswith("unet.fp16.trt10.13.0.sm90.") and stem.endswith(KEY.digest())


def _write_engine(directory, key, data=b"plan"):
    (directory / f"{key.stem()}.plan").write_bytes(data)
    sidecar = {**key.to_json(), "plan_bytes": len(data)}
    (directory / f"{key.stem()}.json").write_text(json.dumps(sidecar))


def test_find_engine_matches_before_deserialising(tmp_path):
    _write_engine(tmp_path, KEY)
    path, sidecar = find_engine(tmp_path, replace(KEY, profile={}, build_flags={}))
    assert path.read_bytes() == b"plan" and sidecar["profile"] == KEY.profile


@pytest.mark.parametrize(
    "field", ["graph_sha256", "precision", "tensorrt_version", "gpu_name", "compute_capability"]
)
def test_find_engine_names_the_field_that_differs(tmp_path, field):
    _write_engine(tmp_path, KEY)
    wanted = replace(KEY, **{field: "something else"})
    with pytest.raises(EngineMismatchError, match=f"{field}: engine has"):
        find_engine(tmp_path, wanted)


def test_find_engine_without_any(tmp_path):
    with pytest.raises(EngineMismatchError, match="run `sdtrt build` first"):
        find_engine(tmp_path, KEY)


def test_cached_engine_builds_once_then_reuses(tmp_path):
    builds = []
    first = cached_engine(tmp_path, KEY, lambda: builds.append(1) or b"engine-bytes")
    second = cached_engine(tmp_path, KEY, lambda: builds.append(1) or b"other")
    assert first == second and builds == [1] and first.read_bytes() == b"engine-bytes"
    sidecar = json.loads(first.with_suffix(".json").read_text())
    assert sidecar == {**KEY.to_json(), "plan_bytes": 12, "plan_sha256": sidecar["plan_sha256"]}
    # A changed graph is another key: another engine, built.
    changed = cached_engine(tmp_path, replace(KEY, graph_sha256="b" * 64), lambda: b"new")
    assert changed != first and changed.read_bytes() == b"new"


def test_reusing_an_engine_writes_nothing(tmp_path):
    """Engines shipped in a read-only folder (a container image, a Triton-style model
    repository) are reused: no lock file or anything else is written for a reuse."""
    built = cached_engine(tmp_path, KEY, lambda: b"engine-bytes")
    built.with_suffix(".lock").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert cached_engine(tmp_path, KEY, lambda: b"other") == built
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_an_engine_folder_that_cannot_be_written_is_a_clear_error():
    unwritable = Path("/proc/sdtrt-cannot-write-here")  # not even root creates files here
    with pytest.raises(InvalidInputError, match="the engine .* cannot be written: /proc"):
        cached_engine(unwritable, KEY, lambda: b"engine")


def test_a_build_killed_while_writing_leaves_nothing_for_long(tmp_path):
    """A plan's temporary file (1.75 GB for SD 1.5's UNet) left by a process killed while
    writing it: the next build of that engine, holding the lock, removes it."""
    leftover = tmp_path / f".{KEY.stem()}.plan.k1ll3d.tmp"
    leftover.write_bytes(b"half an engine")
    other = tmp_path / ".another.plan.k1ll3d.tmp"  # another engine's: its builder's to clear
    other.write_bytes(b"x")
    cached_engine(tmp_path, KEY, lambda: b"engine")
    assert not leftover.exists() and other.exists()


def test_failed_build_leaves_nothing(tmp_path):
    def boom() -> bytes:
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError):
        cached_engine(tmp_path, KEY, boom)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".lock"]


def test_lock_serialises_two_builds_of_one_engine(tmp_path):
    builds = []

    def slow_build() -> bytes:
        builds.append(threading.get_ident())
        time.sleep(0.3)
        return b"engine"

    threads = [
        threading.Thread(target=cached_engine, args=(tmp_path, KEY, slow_build)) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1  # the second waited for the lock, then reused the engine


no_trt = pytest.mark.skipif(
    tensorrt_version() is not None and torch.cuda.is_available(),
    reason="this machine has TensorRT and a GPU",
)


@no_trt
@pytest.mark.parametrize(
    "args",
    [
        ["build", "--model", "tiny"],
        ["img2img", "--model", "tiny", "--backend", "tensorrt", "--steps", "2"],
    ],
)
def test_without_tensorrt_or_gpu_exit_2_with_how_to_install(args, capsys, tmp_path):
    code = main([*args, *(["--out", str(tmp_path / "o.png")] if args[0] == "img2img" else [])])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    # Without TensorRT: how to install it (the stubs mypy reads must not pass for it).
    assert ("pip install" if tensorrt_version() is None else "NVIDIA GPU") in err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "cuda"], "sees no GPU"),
        (["--device", "cuda", "--cuda-graphs"], "sees no GPU"),
        (["--cuda-graphs"], "--cuda-graphs needs --device cuda"),
    ],
)
def test_cuda_options_without_cuda_exit_2(extra, message, capsys, tmp_path):
    args = ["img2img", "--steps", "2", "--height", "32", "--width", "32"]
    code = main([*args, *extra, "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
