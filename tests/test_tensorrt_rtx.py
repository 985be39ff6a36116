"""TensorRT for RTX: real engines built from our graphs on this CPU machine (ahead of time, no
GPU), reused, rebuilt when their graph or target changes, and refused with the reason when
they are damaged or cannot run on a GPU."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from sdtrt.cli import main
from sdtrt.engine.trt_family import RuntimeCacheFile, check_targets, family_version, runs_on
from sdtrt.engine.trt_profile import max_rows
from sdtrt.errors import EngineMismatchError
from sdtrt.export.networks import NETWORK_NAMES

pytestmark = pytest.mark.skipif(
    family_version("tensorrt-rtx") is None,
    reason="TensorRT-RTX is not installed (pip install 'sdtrt[rtx]')",
)
SMALL = ["--batch", "1-2", "--height", "32-64", "--width", "32-64"]
SMALL += ["--opt-height", "32", "--opt-width", "48"]


def _build(root, engine_dir, *extra):
    args = ["build", "--model", str(root), "--backend", "tensorrt-rtx", *SMALL]
    return main([*args, "--engine-dir", str(engine_dir), *extra])


def _plans(engine_dir):
    return {p.name: p.stat().st_mtime_ns for p in engine_dir.glob("*.plan")}


def test_builds_the_eight_engines_on_cpu_and_reuses_them(
    exported, exported_fp16, tmp_path, caplog, capsys
):
    engines = tmp_path / "engines"
    assert _build(exported.root, engines, "--precision", "fp32") == 0
    assert _build(exported_fp16.root, engines, "--precision", "fp16") == 0
    plans = _plans(engines)
    for precision in ("fp32", "fp16"):
        for network in NETWORK_NAMES:
            (name,) = [p for p in plans if p.startswith(f"{network}.{precision}.rtx")]
            assert "sm80-86-89-120p" in name  # the portable targets are in the name
            sidecar = json.loads((engines / name).with_suffix(".json").read_text())
            assert sidecar["family"] == "tensorrt-rtx"
            assert sidecar["compute_capability"] == "8.0,8.6,8.9,12.0+"
            assert sidecar["gpu_name"] == "" and sidecar["plan_bytes"] > 100_000
            assert sidecar["build_flags"]["require_user_allocation"] is True  # capturable
            # What a server reads from the sidecar: rows per call (--batch 1-2 was built).
            assert max_rows(sidecar["profile"]) == (4 if network == "unet" else 2)
            if network == "unet":  # from one row (one image, unguided) up
                assert sidecar["profile"]["sample"]["min"][0] == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sdtrt.engine.trt_cache"):
        assert _build(exported_fp16.root, engines, "--precision", "fp16") == 0
    assert caplog.text.count("reusing engine") == 4 and "building" not in caplog.text
    assert _plans(engines) == plans


def test_engines_are_built_capturable(exported_fp16, tmp_path, monkeypatch):
    """The builder config that makes each engine has REQUIRE_USER_ALLOCATION set (CUDA graph
    capture of a TensorRT-RTX engine needs it), read back from the config at build time."""
    import polygraphy.backend.trt as polygraphy_trt
    import tensorrt_rtx as trt

    seen = []
    real = polygraphy_trt.PostprocessConfig

    def spy(config, func):
        def applied(builder, network, cfg):
            func(builder, network, cfg)
            seen.append(cfg.get_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION))

        return real(config, applied)

    monkeypatch.setattr(polygraphy_trt, "PostprocessConfig", spy)
    assert _build(exported_fp16.root, tmp_path / "engines", "--targets", "8.9") == 0
    assert seen == [True] * len(NETWORK_NAMES)


def test_another_target_is_another_engine(exported_fp16, tmp_path):
    engines = tmp_path / "engines"
    assert _build(exported_fp16.root, engines, "--targets", "8.6") == 0
    first = _plans(engines)
    assert all(".sm86." in name for name in first)
    assert _build(exported_fp16.root, engines, "--targets", "8.6,12.0") == 0
    assert len(_plans(engines)) == 8 and set(first) < set(_plans(engines))


def test_a_changed_graph_rebuilds_only_its_engine(exported_fp16, tmp_path, caplog):
    from sdtrt.engine.trt_build import build_engines
    from sdtrt.export.folder import ExportedModel
    from sdtrt.options import BuildOptions, BuildRanges

    options = BuildOptions(ranges=BuildRanges(batch=(1, 2), height=(32, 64), width=(32, 64),
                                              opt_height=32, opt_width=48))  # fmt: skip
    engines = tmp_path / "engines"
    paths = build_engines(exported_fp16, "fp16", options, engines, family="tensorrt-rtx")
    root = shutil.copytree(exported_fp16.root, tmp_path / "copy")
    manifest = json.loads((root / "sdtrt.json").read_text())
    file = manifest["precisions"]["fp16"]["text_encoder"]["file"]
    manifest["graphs"][file]["sha256"]["model_fp16.onnx"] = "0" * 64
    changed = ExportedModel(root, manifest, _verified={file})  # the hash is the change
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sdtrt.engine.trt_cache"):
        again = build_engines(changed, "fp16", options, engines, family="tensorrt-rtx")
    assert again["text_encoder"] != paths["text_encoder"]
    assert {n: again[n] for n in NETWORK_NAMES[1:]} == {n: paths[n] for n in NETWORK_NAMES[1:]}
    assert caplog.text.count("building engine") == 1


def test_engines_built_with_their_own_ranges_are_run_not_built_over(
    exported_fp16, tmp_path, monkeypatch, caplog
):
    """`sdtrt build --batch 1-2 ...` then a run that builds what is missing (the cache's
    runs) or a check pointed at the folder: the engines there are used as they are, and
    only a network with none is built (with the default profile)."""
    import sdtrt.engine.trt_build as trt_build
    from sdtrt.bench.check import _profile_corners
    from sdtrt.engine.trt_build import build_missing_engines

    engines = tmp_path / "engines"
    assert _build(exported_fp16.root, engines) == 0
    plans = _plans(engines)
    assert build_missing_engines(exported_fp16, "fp16", engines, "tensorrt-rtx") == ()
    assert _plans(engines) == plans
    # `sdtrt check --engine-dir`: its requests are the corners of the engines found there.
    monkeypatch.setattr(trt_build, "gpu_identity", lambda: ("NVIDIA GeForce RTX 4090", "8.9"))
    corners = _profile_corners(exported_fp16, "fp16", "tensorrt-rtx", str(engines))
    assert corners == [(1, 32, 32), (2, 64, 64)]
    for path in engines.glob("vae_decoder.*"):
        path.unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sdtrt.engine.trt_cache"):
        built = build_missing_engines(exported_fp16, "fp16", engines, "tensorrt-rtx")
    assert built == ("vae_decoder",) and caplog.text.count("building engine") == 1
    (decoder,) = engines.glob("vae_decoder.*.json")
    assert json.loads(decoder.read_text())["profile"]["latent_sample"]["opt"] == [1, 4, 64, 64]


def test_build_into_a_read_only_folder_of_engines_reuses_them(
    exported_fp16, tmp_path, monkeypatch, capsys
):
    """An entrypoint that runs `sdtrt build --engine-dir D` before `sdtrt serve`, D baked
    into a container image or mounted read-only: with D's engines already built, there is
    nothing to write, so it succeeds; an empty read-only D is refused before any work."""
    from sdtrt.errors import InvalidInputError

    engines = tmp_path / "engines"
    assert _build(exported_fp16.root, engines) == 0
    plans = _plans(engines)

    def read_only(path, what, hint=""):  # what check_writable says on a read-only mount
        raise InvalidInputError(f"{what} {path} cannot be written: read-only file system")

    monkeypatch.setattr("sdtrt.fileio.check_writable", read_only)
    monkeypatch.setattr("sdtrt.engine.trt_cache.check_writable", read_only)
    capsys.readouterr()
    assert _build(exported_fp16.root, engines) == 0 and _plans(engines) == plans
    assert _build(exported_fp16.root, engines, "--targets", "8.6") == 2  # one to build
    assert "cannot be written: read-only" in capsys.readouterr().err
    assert _plans(engines) == plans
    assert _build(exported_fp16.root, tmp_path / "empty") == 2
    assert "--engine-dir" in capsys.readouterr().err


def test_a_corrupt_engine_is_rebuilt_and_never_run(exported_fp16, tmp_path, caplog):
    from sdtrt.engine.trt_build import engine_key
    from sdtrt.engine.trt_cache import find_engine
    from sdtrt.options import BuildOptions, BuildRanges

    engines = tmp_path / "engines"
    assert _build(exported_fp16.root, engines) == 0
    (unet,) = engines.glob("unet.*.plan")
    good = unet.read_bytes()
    unet.write_bytes(good[: len(good) // 2])  # truncated
    ranges = BuildRanges(batch=(1, 2), height=(32, 64), width=(32, 64), opt_height=32,
                         opt_width=48)  # fmt: skip
    key = engine_key(exported_fp16, "unet", "fp16", BuildOptions(ranges=ranges), "tensorrt-rtx")
    with pytest.raises(EngineMismatchError, match="not the size its sidecar records"):
        find_engine(engines, key)
    unet.write_bytes(good[:-4] + b"XXXX")  # same size, other bytes
    with caplog.at_level(logging.WARNING, logger="sdtrt.engine.trt_cache"):
        assert _build(exported_fp16.root, engines) == 0
    assert "does not match its sidecar: building it again" in caplog.text
    assert unet.read_bytes() != good[:-4] + b"XXXX" and len(unet.read_bytes()) > 100_000


def _unparseable(root):
    """The text encoder's graph replaced by one with an operator no TensorRT knows."""
    from sdtrt.export.folder import sha256_file

    node = helper.make_node("NoSuchOperator", ["input_ids"], ["last_hidden_state"],
                            domain="sdtrt.test")  # fmt: skip
    graph = helper.make_graph(
        [node],
        "bad",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["B", 77])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT16, ["B", 77, 32])],
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("sdtrt.test", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    path = root / "text_encoder" / "model_fp16.onnx"
    onnx.save(model, str(path))
    manifest = json.loads((root / "sdtrt.json").read_text())
    manifest["graphs"]["text_encoder/model_fp16.onnx"]["sha256"]["model_fp16.onnx"] = sha256_file(
        path
    )
    (root / "sdtrt.json").write_text(json.dumps(manifest))


def test_a_graph_tensorrt_cannot_parse_fails_clearly(exported_fp16, tmp_path, capsys):
    root = shutil.copytree(exported_fp16.root, tmp_path / "copy")
    _unparseable(root)
    engines = tmp_path / "engines"
    code = _build(root, engines)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "tensorrt-rtx could not build text_encoder" in err and "NoSuchOperator" in err
    assert not [p for p in engines.glob("text_encoder.*") if p.suffix != ".lock"]  # nothing


def test_targets_name_both_capabilities():
    assert runs_on("8.0,8.6,8.9,12.0+", "8.6") and runs_on("8.0,8.6,8.9,12.0+", "12.1")
    assert not runs_on("8.0,8.6,8.9,12.0+", "9.0") and not runs_on("8.6", "8.9")
    with pytest.raises(EngineMismatchError) as info:
        check_targets("8.0,8.6,8.9,12.0+", "9.0", "NVIDIA H100 80GB HBM3")
    message = str(info.value)
    assert "targets compute capability 8.0, 8.6, 8.9, 12.0 and later" in message
    assert "this GPU is 9.0 (NVIDIA H100 80GB HBM3)" in message
    assert "use --backend tensorrt" in message


def test_find_engine_checks_the_gpu_against_the_targets(tmp_path):
    from sdtrt.engine.trt_cache import EngineKey, find_engine

    key = EngineKey("unet", "a" * 64, "fp16", "1.7.1.116", "", "8.6,8.9", "tensorrt-rtx")
    (tmp_path / f"{key.stem()}.plan").write_bytes(b"plan")
    sidecar = {**key.to_json(), "plan_bytes": 4}
    (tmp_path / f"{key.stem()}.json").write_text(json.dumps(sidecar))
    runtime_key = EngineKey("unet", "a" * 64, "fp16", "1.7.1.116", "", "", "tensorrt-rtx")
    assert find_engine(tmp_path, runtime_key, ("NVIDIA RTX 4090", "8.9"))[1]["network"] == "unet"
    with pytest.raises(EngineMismatchError, match="8.6, 8.9; this GPU is 9.0"):
        find_engine(tmp_path, runtime_key, ("NVIDIA H200", "9.0"))


class _FakeCache:
    def __init__(self, valid: bytes):
        self.valid, self.content, self.resets = valid, b"", 0

    def deserialize(self, blob):
        if blob != self.valid:
            return False
        self.content = blob
        return True

    def reset(self):
        self.resets += 1
        self.content = b""

    def serialize(self):
        return self.content + b"+kernels"


def test_runtime_cache_file(tmp_path, caplog):
    path = tmp_path / "unet.runtime-cache"
    fresh = RuntimeCacheFile(path, _FakeCache(b"ok"))  # none yet: nothing to load
    fresh.save()
    assert path.read_bytes() == b"+kernels" and not list(tmp_path.glob(".*tmp"))
    path.write_bytes(b"ok")
    loaded = RuntimeCacheFile(path, _FakeCache(b"ok"))
    assert loaded.cache.content == b"ok" and loaded.cache.resets == 0
    path.write_bytes(b"corrupt")
    with caplog.at_level(logging.WARNING):
        damaged = RuntimeCacheFile(path, _FakeCache(b"ok"))
    assert damaged.cache.resets == 1 and "unreadable: starting a fresh one" in caplog.text


def test_runtime_cache_in_a_read_only_folder_is_a_warning(caplog):
    """Engines shipped read-only (a container image, a mounted model repository): the
    kernels compiled at run time cannot be kept, which must not fail the request that
    compiled them; said once per cache."""
    path = Path("/proc/sdtrt-cannot-write-here/unet.runtime-cache")  # not even root writes
    cache = RuntimeCacheFile(path, _FakeCache(b"ok"))
    with caplog.at_level(logging.WARNING):
        cache.save()
        cache.save()
    assert [r.getMessage().split(" (")[0] for r in caplog.records if r.levelname == "WARNING"] == [
        f"runtime cache {path} cannot be written"
    ]
    assert not path.parent.exists()


def test_one_polygraphy_family_per_process():
    code = """
from sdtrt.engine.trt_family import use_polygraphy_family
from sdtrt.errors import BackendUnavailableError
use_polygraphy_family("tensorrt-rtx")
import polygraphy.backend.trt
from polygraphy.mod.trt_importer import tensorrt_module_and_version_string
print(tensorrt_module_and_version_string())
use_polygraphy_family("tensorrt-rtx")  # the same family again: fine
try:
    use_polygraphy_family("tensorrt")
except BackendUnavailableError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, second = out.stdout.strip().splitlines()
    assert first.startswith("tensorrt_rtx")
    assert "already uses tensorrt-rtx through polygraphy, which cannot switch" in second


def test_a_taesd_models_engines_build_from_its_latents_graph(taesd_exported, tmp_path):
    """A model with TAESD as its VAE (``--vae TAESD_DIR``): its encoder graph gives the
    latents, 4 channels where AutoencoderKL's gives 8, and TensorRT-RTX builds both VAE
    engines from it; they are keyed by their own graphs, apart from the model's VAE's."""
    engines = tmp_path / "engines"
    assert _build(taesd_exported.root, engines, "--precision", "fp32") == 0
    for network in ("vae_encoder", "vae_decoder"):
        (sidecar,) = engines.glob(f"{network}.fp32.rtx*.json")
        built = json.loads(sidecar.read_text())
        assert built["graph_sha256"] == taesd_exported.graph_sha256(network, "fp32")
        assert built["plan_bytes"] > 10_000
        assert max_rows(built["profile"]) == 2
    # What TensorRT reads of the encoder graph: one output, the latents' 4 channels.
    import tensorrt_rtx as trt

    from sdtrt.engine.trt_build import _parse

    _, network, _ = _parse(trt, taesd_exported.graph_path("vae_encoder", "fp32"))
    assert network.num_outputs == 1
    output = network.get_output(0)
    assert (output.name, tuple(output.shape)) == ("latents", (-1, 4, -1, -1))
