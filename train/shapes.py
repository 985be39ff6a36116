"""The tiny model's data, made in code: one simple shape in a named colour, of any size and
place, on a plain background, with its caption ("a red circle on a blue background").
Deterministic from a seed, unbounded, no files.

The colour statistics the behaviour tests use live here too: the background is what the
picture's border shows, the shape what differs from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
SHAPES = ("circle", "square", "triangle")
SIDE = 64


@dataclass(frozen=True)
class Scene:
    """One shape on a plain background. The caption names the colours and the shape only:
    size and place vary freely, so a caption does not fix the picture and the model must
    read the (noised) input image for them, as img2img needs (a caption that fixed every
    pixel taught a model that ignored its input: measured, the prompt won even at
    strength 0.1)."""

    colour: str
    shape: str
    background: str
    size: float = 0.5
    """The shape's extent, a fraction of the side."""
    x: float = 0.5
    """The centre, fractions of the side from the left and the top."""
    y: float = 0.5

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"

    def draw(self, side: int = SIDE) -> PIL.Image.Image:
        image = PIL.Image.new("RGB", (side, side), COLOURS[self.background])
        pen = PIL.ImageDraw.Draw(image)
        cx, cy, r = self.x * side, self.y * side, self.size * side / 2
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[self.colour]
        if self.shape == "circle":
            pen.ellipse(box, fill=fill)
        elif self.shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
        return image


def random_scene(rng: np.random.Generator) -> Scene:
    colour, background = rng.choice(list(COLOURS), size=2, replace=False)
    size = float(rng.uniform(0.3, 0.65))
    x, y = (float(v) for v in rng.uniform(size / 2 + 0.05, 0.95 - size / 2, 2))
    return Scene(str(colour), str(rng.choice(SHAPES)), str(background), size, x, y)


def batch(rng: np.random.Generator, n: int, side: int = SIDE) -> tuple[np.ndarray, list[str]]:
    """``n`` pictures as floats in [-1, 1], [n, 3, side, side], and their captions."""
    scenes = [random_scene(rng) for _ in range(n)]
    return pixels_of(scenes, side), [s.caption for s in scenes]


def nearest_colour(rgb: np.ndarray) -> str:
    """The named colour closest to an RGB triple (0-255)."""
    names = list(COLOURS)
    table = np.array([COLOURS[n] for n in names], np.float32)
    return names[int(np.argmin(((table - np.asarray(rgb, np.float32)) ** 2).sum(1)))]


def colours_of(image: np.ndarray) -> tuple[str, str]:
    """(shape colour, background colour) of a picture [H, W, 3] in 0-255: the background is
    the border's median; the shape, the median of the pixels far from it."""
    image = np.asarray(image, np.float32)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background = np.median(border, axis=0)
    far = np.linalg.norm(image - background, axis=-1) > 60
    shape = np.median(image[far], axis=0) if far.sum() > 16 else background
    return nearest_colour(shape), nearest_colour(background)


def pixels_of(scenes: list[Scene], side: int = SIDE) -> np.ndarray:
    """Pictures as floats in [-1, 1], [n, 3, side, side]."""
    pixels = np.stack([np.asarray(s.draw(side), np.float32) for s in scenes])
    return pixels.transpose(0, 3, 1, 2) / 127.5 - 1.0
