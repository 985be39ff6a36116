"""The Hugging Face ONNX layout with a real client: optimum-onnx loads what `sdtrt export`
writes, and its img2img equals sdtrt's. optimum needs transformers < 4.58, so it runs from
its own venv (`make` builds .venv-optimum); without it these tests skip and say so."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from interop.settings import CALL, PROMPT, SEED

from sdtrt.runtime.pipeline import Img2ImgPipeline

ROOT = Path(__file__).parent.parent
OPTIMUM_PYTHON = Path(os.environ.get("SDTRT_OPTIMUM_PYTHON", ROOT / ".venv-optimum/bin/python"))
SCRIPT = Path(__file__).parent / "interop" / "optimum_img2img.py"
pytestmark = pytest.mark.skipif(
    not OPTIMUM_PYTHON.exists(),
    reason=f"no optimum venv at {OPTIMUM_PYTHON} (make builds it; or set SDTRT_OPTIMUM_PYTHON)",
)


@pytest.mark.parametrize(
    "ours, theirs",
    [("lms", "LMSDiscreteScheduler"), ("euler_a", "EulerAncestralDiscreteScheduler")],
)
def test_optimum_runs_our_export_and_agrees(exported, tmp_path, ours, theirs):
    rng = np.random.default_rng(0)
    image = tmp_path / "in.png"
    PIL.Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "optimum.npy"
    run = subprocess.run(
        [str(OPTIMUM_PYTHON), str(SCRIPT), str(exported.root), str(image), theirs, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    # optimum read the VAE's scaling factor from our config.json, not its 2^(blocks-1) guess
    assert run.stdout.split()[-1] == "0.18215"
    pipe = Img2ImgPipeline.from_pretrained(exported.root, scheduler=ours, show_progress=False)
    got = pipe(
        PROMPT,
        PIL.Image.open(image).convert("RGB"),
        generator=torch.Generator().manual_seed(SEED),
        **CALL,
    ).images
    theirs_images = np.load(out)
    assert theirs_images.shape == got.shape == (1, 32, 48, 3)
    assert float(np.abs(theirs_images - got).max()) <= 1e-5


def test_export_writes_both_tokenizer_formats_and_configs(exported):
    import json

    root = exported.root
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer.json"):
        assert (root / "tokenizer" / name).is_file(), name
    # The slow format holds the fast one's BPE model exactly (optimum's transformers 4 reads
    # it: the img2img test above then agrees with ours to 1e-5, same token ids).
    model = json.loads((root / "tokenizer/tokenizer.json").read_text())["model"]
    assert json.loads((root / "tokenizer/vocab.json").read_text()) == model["vocab"]
    merges = (root / "tokenizer/merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version") and merges[1:] == [" ".join(m) for m in model["merges"]]
    assert exported.tokenizer().get_vocab() == model["vocab"]
    for half in ("vae_encoder", "vae_decoder"):
        config = json.loads((root / half / "config.json").read_text())
        assert config["scaling_factor"] == pytest.approx(0.18215)
    assert json.loads((root / "unet/config.json").read_text())["_class_name"] == (
        "UNet2DConditionModel"
    )
    assert json.loads((root / "text_encoder/config.json").read_text())["hidden_size"] == 32
