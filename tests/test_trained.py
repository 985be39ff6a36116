"""The embedded tiny model is trained (train/, ``make train-tiny``) so that it shows what
img2img does: the input's colours kept at low strength, the prompt's taking over as the
strength grows, text-to-image that follows its caption, guidance that helps. Fixed seeds,
torch on CPU; each threshold is the value measured on the shipped weights with a margin
(the measured figures: bench/README.md, "The trained tiny model")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdtrt.bench import strength
from sdtrt.runtime.pipeline import Img2ImgPipeline
from sdtrt.train import shapes

# Measured on the shipped weights (commit of this file), then given a margin:
KEPT_PAIRS = 50  # of 56 colour pairs kept by an autoencoder round trip (measured: 56)
ROUND_TRIP_ERROR = 8.0  # mean |round trip - picture|, 0-255 (measured: 5.6)
BACKGROUND_FOLLOWED = 0.75  # text-to-image, guidance 3 (measured: 0.94)
BOTH_FOLLOWED = 0.7  # shape and background colours both (measured: 0.84)
GUIDANCE_GAIN = 0.25  # guidance 3 over guidance 1, both colours (measured: 0.84 vs 0.44)
MONOTONE_TOLERANCE = 3.0  # 0-255 (measured: the median rises at every step, by 0.2 to 52)
RISE = 4.0  # distance at strength 1.0 over 0.1 (measured: 100 / 6.5)
# Seeds with the prompt's colours at strength 1.0 (measured: 3 of 4; the fourth swaps the
# colour roles, "a red triangle on a yellow background", from strength 0.6 on).
PROMPT_WON_AT_1 = 0.5


@pytest.fixture(scope="module")
def pipe(tiny):
    return Img2ImgPipeline.from_components(tiny, "torch", show_progress=False)


@pytest.fixture(scope="module")
def curve(pipe):
    return strength.strength_curve(pipe)


@pytest.fixture(scope="module")
def guided(pipe):
    return strength.adherence(pipe, strength.GUIDANCE)


def test_the_autoencoder_keeps_every_colour_pair(tiny):
    """Round trips of a shape in each colour on each other colour (56 pairs) read back as
    their colours: what img2img at low strength can keep at best."""
    names = list(shapes.COLOURS)
    scenes = [
        shapes.Scene(a, shapes.SHAPES[i % 3], b)
        for i, (a, b) in enumerate((a, b) for a in names for b in names if a != b)
    ]
    vae = tiny["vae"]
    with torch.no_grad():
        pixels = torch.from_numpy(shapes.pixels_of(scenes))
        back = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    images = ((back.permute(0, 2, 3, 1).numpy() + 1) * 127.5).clip(0, 255)
    kept = sum(
        shapes.colours_of(image) == (s.colour, s.background)
        for s, image in zip(scenes, images, strict=True)
    )
    error = np.abs(images - (pixels.permute(0, 2, 3, 1).numpy() + 1) * 127.5).mean()
    assert kept >= KEPT_PAIRS and error <= ROUND_TRIP_ERROR, (kept, error)


def test_text_to_image_follows_the_caption(guided):
    """Strength 1.0 from a grey picture, 8 captions (every colour as shape and as
    background) x 4 seeds, guidance 3: the picture's colours are the caption's. (At
    guidance 8: 0.78 of pairs, against 0.44 at 1.)"""
    assert guided.background >= BACKGROUND_FOLLOWED, guided
    assert guided.both >= BOTH_FOLLOWED, guided


def test_classifier_free_guidance_helps(pipe, guided):
    unguided = strength.adherence(pipe, 1.0)
    assert guided.both >= unguided.both + GUIDANCE_GAIN, (guided, unguided)


def test_distance_to_the_input_grows_with_strength(curve):
    """The seed's claim, over strengths 0.1-1.0 (the distance's median over 4 seeds):
    monotone (each point within a small tolerance of the one before) and far from flat."""
    distances = [p.distance for p in curve]
    for before, after in zip(distances, distances[1:], strict=False):
        assert after >= before - MONOTONE_TOLERANCE, distances
    assert distances[-1] >= RISE * distances[0], distances


def test_low_strength_keeps_the_input_and_high_strength_follows_the_prompt(curve):
    """A red circle on blue, prompted "a yellow square on a green background"."""
    low, high = curve[0], curve[-1]
    assert low.input_kept >= 0.75 and low.prompt_won == 0, low
    assert high.prompt_won >= PROMPT_WON_AT_1 and high.input_kept == 0, high


def test_the_demo_input_is_the_scene_it_names():
    import PIL.Image

    shipped = np.asarray(PIL.Image.open(strength.DEMO_IMAGE).convert("RGB"))
    assert np.array_equal(shipped, np.asarray(strength.INPUT.draw()))
