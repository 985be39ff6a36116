"""Model loading: built-in sets, saved diffusers folders, and what is refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import diffusers_img2img, save_diffusers_folder

from sdtrt.errors import ModelNotFoundError
from sdtrt.models import (
    build_sd15_random,
    build_sd21_random,
    load_components,
    model_fingerprint,
)
from sdtrt.runtime.pipeline import Img2ImgPipeline


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_random_sets_have_the_real_models_sizes():
    # Built on the meta device: shapes only, no memory, no time.
    with torch.device("meta"):
        sd15, sd21 = build_sd15_random(), build_sd21_random()
    assert [_count(sd15[k]) for k in ("text_encoder", "unet", "vae")] == [
        123_060_480,
        859_520_964,
        83_653_863,
    ]
    assert [_count(sd21[k]) for k in ("text_encoder", "unet", "vae")] == [
        340_387_840,
        865_910_724,
        83_653_863,
    ]
    assert sd21["scheduler"].config.prediction_type == "v_prediction"


def test_tiny_is_deterministic(tiny):
    assert model_fingerprint(load_components("tiny")) == model_fingerprint(tiny)


def test_saved_folder_loads_and_runs_the_same(tiny, images, tmp_path):
    save_diffusers_folder(tiny, tmp_path / "model")
    loaded = load_components(str(tmp_path / "model"))
    assert set(loaded) == {"tokenizer", "text_encoder", "unet", "vae", "scheduler"}
    assert model_fingerprint(loaded) == model_fingerprint(load_components(str(tmp_path / "model")))
    run = dict(strength=0.6, num_inference_steps=5, guidance_scale=8.0, output_type="np")
    # The folder's own scheduler class: the same schedule as in memory.
    a, b = (
        Img2ImgPipeline.from_components(c, scheduler="pndm", show_progress=False)(
            "a dancer", images[0], generator=torch.Generator().manual_seed(0), **run
        )
        for c in (tiny, loaded)
    )
    np.testing.assert_array_equal(a.images, b.images)
    # Another class: save_pretrained writes default values out, so LMS takes the saved
    # "leading" spacing rather than its own default; diffusers does the same.
    ours = Img2ImgPipeline.from_components(loaded, scheduler="lms", show_progress=False)
    want = diffusers_img2img(loaded, "LMSDiscreteScheduler")(
        "a dancer", images[0], generator=torch.Generator().manual_seed(0), **run
    ).images
    got = ours("a dancer", images[0], generator=torch.Generator().manual_seed(0), **run).images
    assert float(np.abs(got - want).max()) <= 1e-6


def test_incomplete_folder_names_what_is_missing(tiny, tmp_path):
    save_diffusers_folder(tiny, tmp_path / "model")
    shutil.rmtree(tmp_path / "model" / "vae")
    with pytest.raises(ModelNotFoundError, match="missing vae"):
        load_components(str(tmp_path / "model"))


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ModelNotFoundError, match="tiny, tiny-random, sd15-random, sd21-random"):
        load_components("sd3")
