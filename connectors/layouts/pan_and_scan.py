"""``pan_and_scan`` (Gemma 3): the whole image squashed to the tower's size, then, for an image elongated
enough, 2 to ``max_num_crops`` crops side by side along its long side, each squashed to the tower's size.

Pixels: pan and scan acts when the long side over the short side is at least ``min_ratio_to_activate``; the
number of crops is that ratio rounded half up, at most the long side over ``min_crop_size`` (truncated),
then clamped to 2 .. ``max_num_crops``; each crop is the long side divided by that number (rounded up) by
the whole short side, the last one cut at the image's edge; when a crop would be under ``min_crop_size``
on either side there are none. The whole image comes first, the crops after it in reading order.

Tokens: the crops' tokens in crop order (``mm_tokens_per_image`` per crop, the connector's). Prompt: each
crop in its own ``\\n\\n<start_of_image>`` tokens ``<end_of_image>\\n\\n`` block; with crops, the whole
image's block follows ``"Here is the original image "`` and the crops' blocks, joined by spaces, follow
``" and here are some crops to help you see better "``. Every rule and rounding is the one of
transformers' ``Gemma3ImageProcessor`` (``pan_and_scan_min_crop_size``, ``pan_and_scan_max_num_crops``,
``pan_and_scan_min_ratio_to_activate``) and ``Gemma3Processor(do_pan_and_scan=True)``: crops bit for bit
with the tower processor's backend (``"torchvision"``: ``Gemma3ImageProcessor``; ``"pil"``:
``Gemma3ImageProcessorPil``), prompt text and token counts equal (tests/test_layouts_split_pan.py).
"""

from __future__ import annotations

import itertools
import math

from .base import Box, Crop, CropShape, ImageLayout, ImagePlan, Segment, Size, Step, segments
from .registry import register_layout

BOI, EOI = "<start_of_image>", "<end_of_image>"
ORIGINAL = "Here is the original image "
CROPS = " and here are some crops to help you see better "


def pan_and_scan_grid(
    image_size: Size, min_crop_size: int, max_num_crops: int, min_ratio_to_activate: float
) -> tuple[Size, Size]:
    """(rows, cols) of crops of an image of ``image_size`` (height, width) and the (height, width) of one
    crop; (0, 0) crops when pan and scan does not act (transformers' ``pan_and_scan``)."""
    height, width = image_size
    if width >= height:
        if width / height < min_ratio_to_activate:
            return (0, 0), (0, 0)
        count = min(int(math.floor(width / min_crop_size)), int(math.floor(width / height + 0.5)))
        rows, cols = 1, min(max_num_crops, max(2, count))
    else:
        if height / width < min_ratio_to_activate:
            return (0, 0), (0, 0)
        count = min(int(math.floor(height / min_crop_size)), int(math.floor(height / width + 0.5)))
        rows, cols = min(max_num_crops, max(2, count)), 1
    crop_h, crop_w = int(math.ceil(height / rows)), int(math.ceil(width / cols))
    if min(crop_h, crop_w) < min_crop_size:
        return (0, 0), (0, 0)
    return (rows, cols), (crop_h, crop_w)


def crop_boxes(image_size: Size, grid: Size, crop: Size) -> list[Box]:
    """Row-major (top, left, height, width) boxes of a ``grid`` of ``crop`` sized crops, each cut at the
    image's edge (a slice past it is shorter)."""
    height, width = image_size
    boxes = []
    for top, left in itertools.product(
        range(0, grid[0] * crop[0], crop[0]), range(0, grid[1] * crop[1], crop[1])
    ):
        box = (top, left, min(crop[0], height - top), min(crop[1], width - left))
        if box[2] < 1 or box[3] < 1:
            raise ValueError(
                f"pan and scan cuts an empty crop at ({top}, {left}) out of a {height}x{width} image "
                "(transformers' processor fails on it too): raise min_crop_size"
            )
        boxes.append(box)
    return boxes


def image_block(tokens: int) -> tuple[Segment, ...]:
    """One crop's block in Gemma 3's prompt (``Gemma3Processor.full_image_sequence``)."""
    return (f"\n\n{BOI}", tokens, f"{EOI}\n\n")


@register_layout("pan_and_scan")
class PanAndScan(ImageLayout):
    """Gemma 3's pan and scan (module docstring). Options, defaults as ``Gemma3Processor``'s:
    ``min_crop_size`` (256), ``max_num_crops`` (4), ``min_ratio_to_activate`` (1.2)."""

    def __init__(
        self,
        crop: CropShape,
        *,
        min_crop_size: int = 256,
        max_num_crops: int = 4,
        min_ratio_to_activate: float = 1.2,
    ) -> None:
        name = self.name
        for key, value, least in (("min_crop_size", min_crop_size, 1), ("max_num_crops", max_num_crops, 2)):
            if value < least:  # types: checked by the registry against the defaults
                raise ValueError(f"image layout {name!r}: {key} must be at least {least}, got {value!r}")
        self.min_crop_size = min_crop_size
        self.max_num_crops = max_num_crops
        self.min_ratio_to_activate = float(min_ratio_to_activate)
        super().__init__(
            crop,
            min_crop_size=min_crop_size,
            max_num_crops=max_num_crops,
            min_ratio_to_activate=self.min_ratio_to_activate,
        )

    def text_tokens(self) -> tuple[str, ...]:
        return (BOI, EOI)

    def _plan(self, image_size: Size) -> ImagePlan:
        size, tokens = self.crop.size, self.crop.tokens
        grid, crop = pan_and_scan_grid(
            image_size, self.min_crop_size, self.max_num_crops, self.min_ratio_to_activate
        )
        whole = Crop((Step(size=size),), "base")
        if grid == (0, 0):
            return ImagePlan(image_size, (whole,), tokens, image_block(tokens))
        boxes = crop_boxes(image_size, grid, crop)
        crops = tuple(
            Crop((Step(box=box, size=size),), "tile", divmod(i, grid[1])) for i, box in enumerate(boxes)
        )
        blocks: list[Segment] = [ORIGINAL, *image_block(tokens), CROPS]
        for i in range(len(crops)):
            blocks += [" " if i else "", *image_block(tokens)]
        return ImagePlan(image_size, (whole, *crops), (len(crops) + 1) * tokens, segments(*blocks), grid)
