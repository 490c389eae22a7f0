"""Synthetic data where resolution decides the answer: a small checkerboard mark on a grey canvas.

Each image is a canvas of 2x2, 1x2 or 2x1 tiles (``tile``: the tower's input size) of mid grey with a
little noise, holding one mark of ``tile // 2`` pixels a side: a one-pixel checkerboard of two opposite
colours (red and cyan, green and magenta, blue and yellow, black and white) around that same grey, faded
towards its edges (a Hann window). The answer is the mark's first colour (``red``, ``green``, ``blue``,
``black``; chance is 25%).

Squashed to one tile (the ``fixed`` layout), each axis of the canvas that is longer than a tile shrinks by
2, and the antialiased half-size resize of an interpolating kernel (bicubic, bilinear) cancels a pattern
that alternates every pixel along that axis; the window keeps its edges from leaving a fringe. What is left
of the mark is within one grey level of the background (measured with the tower processor's bicubic
resize), and the answer is gone. Cut into tiles at the canvas' own scale
(``anyres``, whose default grids include 2x2, 1x2 and 2x1), every pixel of the mark reaches the tower.
Everything is a pure function of the seed.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from PIL import Image

from .shapes import _encode, write_tar_shards

PAIRS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "red": ((255, 0, 0), (0, 255, 255)),
    "green": ((0, 255, 0), (255, 0, 255)),
    "blue": ((0, 0, 255), (255, 255, 0)),
    "black": ((0, 0, 0), (255, 255, 255)),
}
CANVASES = ((2, 2), (1, 2), (2, 1))  # (rows, cols) of tiles
PROMPT = "mark colour"
_SPLIT_IDS = {"train": 0, "val": 1}


def draw_mark(answer: str, tile: int, rng: np.random.Generator) -> Image.Image:
    """A canvas of one of :data:`CANVASES` with the checkerboard mark of ``answer`` at a random place (on
    even pixel coordinates, so that each pair of pixels a 2x shrink averages holds both colours)."""
    rows, cols = CANVASES[int(rng.integers(len(CANVASES)))]
    height, width, side = rows * tile, cols * tile, tile // 4 * 2
    canvas = 127.5 + rng.normal(0.0, 2.0, size=(height, width, 3))  # (H, W, 3): the colours' mean grey
    top = 2 * int(rng.integers(0, (height - side) // 2 + 1))
    left = 2 * int(rng.integers(0, (width - side) // 2 + 1))
    first, second = (np.array(c, np.float64) for c in PAIRS[answer])
    y, x = np.mgrid[0:side, 0:side]
    sign = np.where((y + x) % 2 == 0, 1.0, -1.0)  # (side, side): the checkerboard
    hann = np.sin(np.pi * (np.arange(side) + 0.5) / side) ** 2
    mark = (sign * hann[:, None] * hann[None, :])[..., None] * (first - second) / 2  # (side, side, 3)
    canvas[top : top + side, left : left + side] += mark
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))


def write_stripes(
    out_dir: str | Path, *, n_train: int, n_val: int, tile: int, seed: int = 0, shard_size: int = 1024
) -> dict[str, str]:
    """``train/`` and ``val/`` tar shards of ``{key}.png`` and ``{key}.json`` (``prompt``, ``answer``);
    returns the brace pattern of each split."""
    if tile < 8:
        raise ValueError(f"tile must be at least 8 pixels (the mark is tile // 2), got {tile}")
    out, names = Path(out_dir), list(PAIRS)

    def files(split: str, index: int) -> list[tuple[str, bytes]]:
        rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
        answer = names[int(rng.integers(len(names)))]
        key = f"{split}-{index:07d}"
        meta = json.dumps({"prompt": PROMPT, "answer": answer}, sort_keys=True).encode("utf-8")
        return [(f"{key}.png", _encode(draw_mark(answer, tile, rng), "png")), (f"{key}.json", meta)]

    return {
        split: write_tar_shards(
            out / split, f"stripes-{split}", n, shard_size, functools.partial(files, split)
        )
        for split, n in (("train", n_train), ("val", n_val))
    }
