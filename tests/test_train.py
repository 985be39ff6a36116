"""The tiny model's training data and loop (train/): pictures and captions made in code,
the colour statistics used to judge outputs, and a training step that learns."""

from __future__ import annotations

import numpy as np

from sdtrt.train import shapes


def test_drawn_scenes_read_back_as_their_caption_colours():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = shapes.random_scene(rng)
        assert shapes.colours_of(np.asarray(scene.draw())) == (scene.colour, scene.background)
        assert scene.caption == f"a {scene.colour} {scene.shape} on a {scene.background} background"


def test_the_data_is_deterministic_from_its_seed_and_in_range():
    a_pixels, a_captions = shapes.batch(np.random.default_rng(5), 8)
    b_pixels, b_captions = shapes.batch(np.random.default_rng(5), 8)
    assert np.array_equal(a_pixels, b_pixels) and a_captions == b_captions
    assert a_pixels.shape == (8, 3, 64, 64) and a_pixels.min() >= -1 and a_pixels.max() <= 1


def test_every_caption_word_is_one_token_of_the_tiny_tokenizer(tiny):
    words = {"a", "on", "background", *shapes.COLOURS, *shapes.SHAPES}
    for word in words:
        assert tiny["tokenizer"].tokenize(word) == [f"{word}</w>"], word


def test_the_autoencoder_step_learns():
    from sdtrt.models import build_tiny
    from sdtrt.train.tiny import train_vae

    losses = train_vae(build_tiny()["vae"], steps=30, batch=8, lr=1e-3, seed=0)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_captions_are_dropped_and_contradicted_less_as_the_noise_grows():
    from sdtrt.train.tiny import _caption

    captions = [shapes.Scene(c, "circle", "grey").caption for c in shapes.COLOURS]  # distinct
    rng = np.random.default_rng(0)

    def rates(t: int) -> tuple[float, float]:
        got = [_caption(captions, 3, t, rng) for _ in range(4000)]
        dropped = sum(c == "" for c in got) / len(got)
        wrong = sum(c not in ("", captions[3]) for c in got) / len(got)
        return dropped, wrong

    dropped, wrong = rates(0)
    assert abs(dropped - 0.10) < 0.02 and abs(wrong - 0.9 * 0.4 * 7 / 8) < 0.03
    dropped, wrong = rates(500)
    assert abs(dropped - 0.10) < 0.02 and abs(wrong - 0.9 * 0.2 * 7 / 8) < 0.03
    assert rates(999)[1] < 0.005


def test_the_taesd_distillation_learns_and_saves_what_vae_reads(tiny, tmp_path):
    """The pool is the UNet's img2img latents (as many as asked, over the pipeline's batch
    limit); both halves' losses fall within a few steps; the saved folder is a diffusers
    AutoencoderTiny that ``--vae`` loads, its weights the trained ones rounded to fp16."""
    import torch

    from sdtrt.adapters import load_vae
    from sdtrt.train.taesd import build_tiny_taesd, distill, save, unet_latents

    pool = unet_latents(tiny, 20, seed=5)
    assert pool.shape == (20, 4, 8, 8) and bool(torch.isfinite(pool).all())
    assert float(pool.std()) > 0.5  # latents, not noise-free zeros (measured: about 1)
    taesd = build_tiny_taesd(seed=0)
    losses = distill(taesd, tiny["vae"], pool, steps=30, batch=8, lr=2e-3, seed=0)
    for half in ("encoder", "decoder"):
        assert np.mean(losses[half][-5:]) < 0.8 * np.mean(losses[half][:5]), half
    save(taesd, tmp_path / "taesd", {"steps": 30})
    loaded = load_vae(str(tmp_path / "taesd"), tiny["vae"], allow_pickle=False)
    assert type(loaded).__name__ == "AutoencoderTiny"
    for key, value in taesd.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.half().float()), key


def test_the_training_record_names_the_commit_and_whether_the_tree_was_changed(tmp_path):
    """A run records the commit it starts at, "-dirty" where tracked files differ from it
    (the first tiny TAESD run, before its code was committed, would have said so)."""
    import subprocess

    from sdtrt.train.tiny import head_commit

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True,
                              text=True).stdout.strip()  # fmt: skip

    git("init", "-q")
    (tmp_path / "train.py").write_text("steps = 1\n")
    git("add", "train.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    sha = git("rev-parse", "HEAD")
    assert head_commit(tmp_path) == sha and len(sha) == 40
    (tmp_path / "train.py").write_text("steps = 2\n")
    assert head_commit(tmp_path) == sha + "-dirty"
