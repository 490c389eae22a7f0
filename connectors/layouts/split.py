"""``split`` (Idefics3 / SmolVLM): tower-sized tiles of the image resized to a whole number of tiles, plus
the whole image squashed to one tile, last.

Pixels: the image is resized keeping its aspect ratio so that its longest edge is ``longest_edge``
(Idefics3's ``size={"longest_edge": ...}``; small images are enlarged; the other side rounded up to an even
number), then resized again so that both sides are whole numbers of tiles (``max_image_size``, the tower's
input size; the short side follows the long one's rounding, then rounds up), and cut into row-major tiles;
the global image is that canvas resized to one tile. A canvas of one tile is the only crop. Without
``do_image_splitting`` the resized image is squashed to one tile.

Tokens: the crops' tokens in crop order (``image_seq_len`` per crop: the connector's tokens, for Idefics3's
pixel shuffle ``(tile / patch / factor) ** 2``). Prompt: ``<fake_token_around_image><row_r_col_c>`` before
each tile's tokens, a newline after each row of tiles, then a newline and the global image's block
``<fake_token_around_image><global-img>`` tokens ``<fake_token_around_image>``; an image of one crop has the
global block alone. Every rule and rounding is the one of transformers' ``Idefics3ImageProcessor`` /
``SmolVLMImageProcessor`` (the same code) and ``Idefics3Processor`` / ``SmolVLMProcessor``: crops bit for bit
with the tower processor's backend (``"torchvision"``: the default classes; ``"pil"``: their ``*Pil``
classes), prompt text and token counts equal (tests/test_layouts_split_pan.py).
"""

from __future__ import annotations

import math
from typing import Any

from .base import Crop, CropShape, ImageLayout, ImagePlan, Segment, Size, Step, segments
from .registry import register_layout

MAX_IMAGE_SIZE = 4096  # transformers' bound on the resized image's longest edge
DEFAULT_TILES_PER_EDGE = 4  # Idefics3ImageProcessor's size={"longest_edge": 4 * 364}, max_image_size 364
FAKE = "<fake_token_around_image>"
GLOBAL = "<global-img>"


def longest_edge_size(image_size: Size, longest_edge: int) -> Size:
    """The (height, width) of an image resized so that its longest edge is ``longest_edge``, the other side
    truncated then rounded up to even, at least 1, both then bounded by 4096 px (transformers'
    ``_resize_output_size_rescale_to_max_len`` and ``_resize_output_size_scale_below_upper_bound``)."""
    height, width = image_size
    aspect = width / height
    if width >= height:
        width, height = longest_edge, int(longest_edge / aspect)
        height += height % 2
    else:
        height, width = longest_edge, int(longest_edge * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def tile_multiple_size(size: Size, tile: int) -> Size:
    """The (height, width) of the canvas cut into tiles: the long side rounded up to whole tiles, the short
    side scaled by the long side's rounding (truncated) and rounded up to whole tiles (transformers'
    ``resize_for_vision_encoder``)."""
    height, width = size
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def split_prompt(rows: int, cols: int, tokens: int) -> tuple[Segment, ...]:
    """Idefics3's text for an image of ``rows`` x ``cols`` tiles (0 x 0: the global image alone), each crop
    a run of ``tokens`` placeholders (``get_image_prompt_string``)."""
    parts: list[Segment] = []
    for r in range(rows):
        for c in range(cols):
            parts += [f"{FAKE}<row_{r + 1}_col_{c + 1}>", tokens]
        parts.append("\n")
    parts += ["\n" if rows else "", f"{FAKE}{GLOBAL}", tokens, FAKE]
    return segments(*parts)


@register_layout("split")
class Split(ImageLayout):
    """Idefics3 / SmolVLM image splitting (module docstring).

    ``longest_edge``: the size the image's longest edge is resized to before splitting (default 4 tiles,
    Idefics3's 1456 px for 364 px tiles); ``do_image_splitting``: False squashes the resized image to one
    tile (SmolVLM's video frames, Idefics3's option)."""

    def __init__(
        self, crop: CropShape, *, longest_edge: int | None = None, do_image_splitting: bool = True
    ) -> None:
        name = self.name
        if crop.size[0] != crop.size[1]:
            raise ValueError(
                f"image layout {name!r} needs square crops, the tower takes {crop.size[0]}x{crop.size[1]}"
            )
        self.tile = crop.size[0]
        if longest_edge is not None and (
            not isinstance(longest_edge, int) or isinstance(longest_edge, bool) or longest_edge < 1
        ):
            raise ValueError(
                f"image layout {name!r}: longest_edge must be a positive int, got {longest_edge!r}"
            )
        self.longest_edge = DEFAULT_TILES_PER_EDGE * self.tile if longest_edge is None else longest_edge
        self.do_image_splitting = do_image_splitting
        super().__init__(crop, longest_edge=longest_edge, do_image_splitting=do_image_splitting)

    def resolved_options(self) -> dict[str, Any]:
        return {**self.options, "longest_edge": self.longest_edge}

    def text_tokens(self) -> tuple[str, ...]:
        """``<fake_token_around_image>``, ``<global-img>`` and, when splitting, ``<row_r_col_c>`` up to the
        most tiles per side: the resized image's long side is at most ``longest_edge`` (plus one when
        it is odd, rounded up to even), and at most 4096 px."""
        most = math.ceil(min(self.longest_edge + self.longest_edge % 2, MAX_IMAGE_SIZE) / self.tile)
        if not self.do_image_splitting or most == 1:  # one crop, the global block alone
            return (FAKE, GLOBAL)
        cells = (f"<row_{r}_col_{c}>" for r in range(1, most + 1) for c in range(1, most + 1))
        return (FAKE, GLOBAL, *cells)

    def _plan(self, image_size: Size) -> ImagePlan:
        t, tokens = self.tile, self.crop.tokens
        resized = Step(size=longest_edge_size(image_size, self.longest_edge))
        if not self.do_image_splitting:
            crops: tuple[Crop, ...] = (Crop((resized, Step(size=(t, t)))),)
            return ImagePlan(image_size, crops, tokens, split_prompt(0, 0, tokens))
        height, width = tile_multiple_size(resized.size, t)  # type: ignore[arg-type]
        canvas = Step(size=(height, width))
        if height <= t and width <= t:  # one tile: no splitting
            return ImagePlan(image_size, (Crop((resized, canvas)),), tokens, split_prompt(0, 0, tokens))
        rows, cols = height // t, width // t
        tiles = tuple(
            Crop((resized, canvas, Step(box=(r * t, c * t, t, t))), "tile", (r, c))
            for r in range(rows)
            for c in range(cols)
        )
        whole = Crop((resized, canvas, Step(size=(t, t))), "global")
        return ImagePlan(
            image_size,
            (*tiles, whole),
            (len(tiles) + 1) * tokens,
            split_prompt(rows, cols, tokens),
            (rows, cols),
        )
