"""``anyres`` (LLaVA-NeXT) and ``anyres_max`` (LLaVA-OneVision): tower-sized tiles plus a base image.

Pixels: the grid resolution (``grid_pinpoints``, (height, width) multiples of the tile size, transformers'
convention) that keeps the most of the image's pixels and wastes the fewest is chosen; the image is resized
into it keeping its aspect ratio, centred on black padding and cut into row-major tiles; the base image is
the whole image squashed to the tile size and comes first.

Tokens: the base crop's tokens, then the tiles' token grids put back together into one grid, the rows and
columns of padding cut off again (back to the image's aspect ratio), for ``anyres_max`` bilinearly shrunk
when it holds more than ``max_tiles`` tiles' worth of tokens (by more than 10%), and a learned
``image_newline`` vector after each row. Every rule and rounding is the one of transformers'
``LlavaNextProcessor`` / ``LlavaOnevisionProcessor``, their image processors and ``pack_image_features``:
token counts equal, crops bit for bit with the tower processor's backend (``"torchvision"``: the default
``LlavaNextImageProcessor`` / ``LlavaOnevisionImageProcessor``; ``"pil"``: their ``*Pil`` classes), packed
tokens equal (copied tokens exactly, shrunk ones to float rounding; tests/test_layouts.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .base import (
    Box,
    Crop,
    CropShape,
    ImageLayout,
    ImagePlan,
    Learned,
    Packed,
    Pad,
    Size,
    Sizes,
    Step,
    check_crops,
)
from .registry import register_layout

# grids in tiles (rows, cols): LLaVA-NeXT 1.6's five, and LLaVA-OneVision's 6x6
NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
ONEVISION_GRIDS = tuple((r, c) for r in range(1, 7) for c in range(1, 7))
SHRINK_ABOVE = 1.1  # anyres_max shrinks when the side ratio to max_tiles' worth of tokens exceeds this
NEWLINE = -1  # index of the newline vector in a packing plan
IDENTITY = np.array([1, 0, 1, 0], np.float32)  # tap weights of a token taken as it is


# ----------------------------------------------------------------------- geometry (transformers' rules)
def select_best_resolution(image_size: Size, pinpoints: Sequence[Size]) -> Size:
    """The pinpoint (height, width) that keeps most of the image's pixels once it is fitted inside, ties
    broken by the fewest wasted pixels (``transformers.image_processing_utils.select_best_resolution``)."""
    height, width = image_size
    best, most_kept, least_wasted = None, 0, float("inf")
    for pin_h, pin_w in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_w * pin_h - kept
        if kept > most_kept or (kept == most_kept and wasted < least_wasted):
            best, most_kept, least_wasted = (pin_h, pin_w), kept, wasted
    if best is None:
        raise ValueError(f"no grid resolution fits a {height}x{width} image among {list(pinpoints)}")
    return best


def fit_size(image_size: Size, target: Size) -> Size:
    """The image's size resized into ``target`` keeping its aspect ratio (``get_patch_output_size``)."""
    height, width = image_size
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def centre_pad(size: Size, target: Size) -> Pad:
    """(top, left, bottom, right) black padding centring ``size`` in ``target`` (the odd pixel at the
    bottom/right)."""
    top, extra_h = divmod(target[0] - size[0], 2)
    left, extra_w = divmod(target[1] - size[1], 2)
    return top, left, top + extra_h, left + extra_w


def unpadded_box(image_size: Size, grid: Size) -> Box:
    """The (top, left, height, width) part of a ``grid`` of tile tokens that shows the image, not the
    padding around it (transformers' ``unpad_image``: the same rows or columns cut at both ends)."""
    height, width = image_size
    rows, cols = grid
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        cut = (rows - new_rows) // 2
        return cut, 0, rows - 2 * cut, cols
    new_cols = int(round(width * (rows / height), 7))
    cut = (cols - new_cols) // 2
    return 0, cut, rows, cols - 2 * cut


def shrunk_grid(rows: int, cols: int, crop_tokens: int, max_tiles: int) -> Size:
    """``anyres_max``'s grid: (rows, cols) divided by the side ratio to ``max_tiles`` crops' worth of
    tokens when that ratio exceeds 1.1, else unchanged (LLaVA-OneVision's rule and rounding)."""
    ratio = math.sqrt(rows * cols / (max_tiles * crop_tokens))
    if ratio > SHRINK_ABOVE:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


def _pinpoints(value: Any, tile: int, default: tuple[tuple[int, int], ...], name: str) -> tuple[Size, ...]:
    if value is None:
        return tuple((r * tile, c * tile) for r, c in default)
    pins = []
    for pin in value:
        pair = tuple(pin) if isinstance(pin, (list, tuple)) else (pin,)
        if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
            raise ValueError(
                f"image layout {name!r}: grid_pinpoints entry {pin!r} is not a (height, width) pair"
            )
        if pair[0] % tile or pair[1] % tile:
            raise ValueError(
                f"image layout {name!r}: grid_pinpoints entry {list(pair)} is not a multiple of the "
                f"{tile} px tile"
            )
        pins.append(pair)
    if not pins:
        raise ValueError(f"image layout {name!r}: grid_pinpoints is empty")
    return tuple(pins)  # type: ignore[return-value]


# ------------------------------------------------------------------------------ the layouts
@register_layout("anyres")
class AnyRes(ImageLayout):
    """LLaVA-NeXT's tiling: base image, then tiles of the best-fit grid (module docstring).

    ``grid_pinpoints``: (height, width) resolutions in pixels, multiples of the tile size; default
    LLaVA-NeXT 1.6's 1x2, 2x1, 2x2, 3x1 and 1x3 tiles."""

    default_grids = NEXT_GRIDS

    def __init__(self, crop: CropShape, *, grid_pinpoints: list | None = None) -> None:
        name = self.name
        if crop.size[0] != crop.size[1]:
            raise ValueError(
                f"image layout {name!r} needs square crops, the tower takes {crop.size[0]}x{crop.size[1]}"
            )
        if crop.grid is None:
            raise ValueError(
                f"image layout {name!r} lays the crops' tokens out on a grid; the connector gives "
                f"{crop.tokens} tokens per crop without one (learned queries): use a connector that keeps "
                "the token grid"
            )
        self.tile = crop.size[0]
        self.pinpoints = _pinpoints(grid_pinpoints, self.tile, self.default_grids, name)
        stored = None if grid_pinpoints is None else [list(p) for p in self.pinpoints]
        super().__init__(crop, grid_pinpoints=stored)

    def resolved_options(self) -> dict[str, Any]:
        return {**self.options, "grid_pinpoints": [list(p) for p in self.pinpoints]}

    def learned(self, dim: int) -> dict[str, tuple[int, ...]]:
        """``image_newline`` (dim,): transformers initializes it as ``randn(dim) / sqrt(dim)``."""
        return {"image_newline": (dim,)}

    def tile_grid(self, image_size: Size) -> Size:
        """(rows, cols) of tiles an image of ``image_size`` is cut into."""
        best = select_best_resolution(image_size, self.pinpoints)
        return best[0] // self.tile, best[1] // self.tile

    def token_grid(self, image_size: Size) -> tuple[Box, Size]:
        """The kept (top, left, rows, cols) of the tiles' assembled token grid, and the grid its tokens
        end up on (the same size here; shrunk by ``anyres_max``)."""
        rows, cols = self.tile_grid(image_size)
        box = unpadded_box(image_size, (rows * self.crop.grid[0], cols * self.crop.grid[1]))
        return box, (box[2], box[3])

    def _plan(self, image_size: Size) -> ImagePlan:
        t = self.tile
        best = select_best_resolution(image_size, self.pinpoints)
        fitted = fit_size(image_size, best)
        canvas = Step(size=fitted, pad=centre_pad(fitted, best))
        rows, cols = best[0] // t, best[1] // t
        tiles = tuple(
            Crop((canvas, Step(box=(r * t, c * t, t, t))), "tile", (r, c))
            for r in range(rows)
            for c in range(cols)
        )
        base = Crop((Step(size=(t, t)),), "base")
        _, (out_rows, out_cols) = self.token_grid(image_size)
        tokens = self.crop.tokens + out_rows * out_cols + out_rows  # base, grid, one newline per row
        return ImagePlan(image_size, (base, *tiles), tokens, (tokens,), (rows, cols))

    # ---------------------------------------------------------------- model side
    def packing(self, image_size: Size) -> tuple[np.ndarray, np.ndarray]:
        """Where each decoder token of one image comes from: ``index`` (L, 4) rows of the image's crop
        tokens (crop * tokens_per_crop + token; ``NEWLINE`` for the newline vector), the bilinear taps
        (y0, x0), (y0, x1), (y1, x0), (y1, x1), and their ``weight`` (L, 4) float32 (wy0, wy1, wx0, wx1):
        the token is ``(t00 wx0 + t01 wx1) wy0 + (t10 wx0 + t11 wx1) wy1``, torch's order of operations;
        weights (1, 0, 1, 0) where nothing is shrunk."""
        return self._cached("_packing", (int(image_size[0]), int(image_size[1])))

    def _packing(self, image_size: Size) -> tuple[np.ndarray, np.ndarray]:
        gh, gw = self.crop.grid  # type: ignore[misc]
        _, cols = self.tile_grid(image_size)
        (top, left, kept_h, kept_w), (out_h, out_w) = self.token_grid(image_size)
        y = np.arange(top, top + kept_h)[:, None]  # rows of the assembled grid
        x = np.arange(left, left + kept_w)[None, :]
        crop = 1 + (y // gh) * cols + x // gw  # crop 0 is the base image
        grid_index = crop * (gh * gw) + (y % gh) * gw + x % gw  # (kept_h, kept_w)
        taps_y, taps_x = linear_taps(kept_h, out_h), linear_taps(kept_w, out_w)
        index = np.stack(
            [grid_index[iy][:, ix] for iy, _ in taps_y for ix, _ in taps_x], axis=-1
        )  # (out_h, out_w, 4)
        ones = np.ones((out_h, out_w), np.float32)
        weight = np.stack(
            [wy[:, None] * ones for _, wy in taps_y] + [wx[None, :] * ones for _, wx in taps_x], axis=-1
        )  # (out_h, out_w, 4)
        newline_index = np.full((out_h, 1, 4), NEWLINE)
        newline_weight = np.broadcast_to(IDENTITY, (out_h, 1, 4))
        index = np.concatenate([index, newline_index], axis=1).reshape(-1, 4)
        weight = np.concatenate([weight, newline_weight], axis=1).reshape(-1, 4)
        base_index = np.repeat(np.arange(gh * gw)[:, None], 4, axis=1)
        base_weight = np.broadcast_to(IDENTITY, (gh * gw, 4))
        return np.concatenate([base_index, index]), np.concatenate([base_weight, weight]).astype(np.float32)

    def pack(self, features: torch.Tensor, image_sizes: Sizes, learned: Learned = None) -> Packed:
        """Connector outputs of every crop of a batch ``(sum of crops, tokens per crop, D)``, images in order
        and each image's crops in plan order -> the images' tokens ``(sum of tokens, D)`` and their counts
        ``(num_images,)``: one gather over the whole batch (and, for the tokens of shrunk grids, a
        bilinear sum of four), no loop over images on tensors."""
        newline = (learned or {}).get("image_newline")
        if newline is None:
            raise ValueError(
                f"image layout {self.name!r} packs with a learned image_newline vector; none given"
            )
        sizes = [(int(s[0]), int(s[1])) for s in image_sizes]
        counts = [self.num_crops(s) for s in sizes]
        check_crops(self.name, features, counts, self.crop.tokens)
        dim = features.shape[-1]
        if newline.shape != (dim,):
            raise ValueError(f"image_newline of shape {tuple(newline.shape)}; expected ({dim},)")
        table = torch.cat([features.reshape(-1, dim), newline.to(features.dtype)[None]])  # (crops * T + 1, D)
        offsets = np.cumsum([0, *counts[:-1]]) * self.crop.tokens
        plans = [self.packing(s) for s in sizes]
        index = np.concatenate(
            [
                np.where(i == NEWLINE, table.shape[0] - 1, i + o)
                for (i, _), o in zip(plans, offsets, strict=True)
            ]
        )
        weight = np.concatenate([w for _, w in plans])
        lengths = torch.tensor([len(i) for i, _ in plans], dtype=torch.long)
        index_t = torch.from_numpy(index).to(features.device)  # (L, 4)
        out = table.index_select(0, index_t[:, 0])  # (L, D): every token taken as it is
        shrunk = np.flatnonzero(weight[:, 1] + weight[:, 3])  # tokens mixing several grid tokens
        if shrunk.size == 0:
            return out, lengths
        rows = torch.from_numpy(shrunk).to(features.device)
        taps = index_t[rows]  # (S, 4)
        w = torch.from_numpy(weight[shrunk]).to(features.device, features.dtype).unsqueeze(-1)  # (S, 4, 1)

        def tap(k: int) -> torch.Tensor:
            return table.index_select(0, taps[:, k])  # (S, D)

        top = tap(0).mul_(w[:, 2]).add_(tap(1).mul_(w[:, 3]))
        bottom = tap(2).mul_(w[:, 2]).add_(tap(3).mul_(w[:, 3]))
        return out.index_copy(0, rows, top.mul_(w[:, 0]).add_(bottom.mul_(w[:, 1]))), lengths  # (L, D)


@register_layout("anyres_max", aliases={"anyres_max_9": {"max_tiles": 9}})
class AnyResMax(AnyRes):
    """LLaVA-OneVision's tiling: ``anyres`` whose assembled token grid is shrunk (bilinear) to about
    ``max_tiles`` crops' worth of tokens when it holds more. ``grid_pinpoints`` default: OneVision's 1..6 x
    1..6 tiles."""

    default_grids = ONEVISION_GRIDS

    def __init__(self, crop: CropShape, *, max_tiles: int = 9, grid_pinpoints: list | None = None) -> None:
        if not isinstance(max_tiles, int) or isinstance(max_tiles, bool) or max_tiles < 1:
            raise ValueError(
                f"image layout {self.name!r}: max_tiles must be a positive int, got {max_tiles!r}"
            )
        self.max_tiles = max_tiles
        super().__init__(crop, grid_pinpoints=grid_pinpoints)
        self.options["max_tiles"] = max_tiles

    def token_grid(self, image_size: Size) -> tuple[Box, Size]:
        box, (rows, cols) = super().token_grid(image_size)
        return box, shrunk_grid(rows, cols, self.crop.tokens, self.max_tiles)


def linear_taps(size_in: int, size_out: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The two taps (index, weight) per output position of ``torch.nn.functional.interpolate(mode=
    "bilinear", align_corners=False)`` shrinking one axis from ``size_in`` to ``size_out``, in float32 as
    torch's CPU kernel computes them; equal sizes give the identity (weights 1 and 0). Shrinking (scale > 1)
    keeps every source position inside (0, size_in - 1), so torch's clamps at both ends never act here."""
    if size_in == size_out or size_out == 0:
        same = np.arange(size_out)
        return [(same, np.ones(size_out, np.float32)), (same, np.zeros(size_out, np.float32))]
    if size_out > size_in:
        raise ValueError(f"bilinear taps only shrink here: {size_in} -> {size_out}")
    scale = np.float32(size_in) / np.float32(size_out)
    # torch's scale * (dst + 0.5) - 0.5 is one fused multiply-add on the float32 scale: one rounding
    src = (np.float64(scale) * (np.arange(size_out) + 0.5) - 0.5).astype(np.float32)
    first = np.floor(src).astype(np.int64)
    frac = src - first.astype(np.float32)  # float32
    return [(first, np.float32(1) - frac), (first + 1, frac)]
