"""``fixed``: one crop, the whole image squashed to the tower's size (aspect ratio not kept), as SigLIP's
processor and PaliGemma/LLaVA do; its tokens are the connector's tokens of that crop."""

from __future__ import annotations

from .base import Crop, ImageLayout, ImagePlan, Size, Step
from .registry import register_layout


@register_layout("fixed")
class Fixed(ImageLayout):
    """One crop per image, resized to the tower's input size."""

    def _plan(self, image_size: Size) -> ImagePlan:
        crop = Crop((Step(size=self.crop.size),))
        return ImagePlan(image_size, (crop,), self.crop.tokens, (self.crop.tokens,))
