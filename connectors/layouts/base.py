"""What an image layout is: how one image of a given size becomes crops (pixels, on the data-loader workers)
and decoder tokens (on the model, batched), and where its placeholders go in the prompt.

A layout answers everything from the image size alone, through :meth:`ImageLayout.plan`: an
:class:`ImagePlan` lists the crops, each as a short chain of pixel :class:`Step` s (cut a box, resize,
pad), the number of decoder tokens and the prompt's segments. :meth:`ImageLayout.crops` runs the chains on
an image with the tower processor's numerics (shared prefixes run once), so a crop equals what a
transformers image processor makes when the chain says what that processor does.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from vision_tower import ImageProcessor, backends

from .registry import LayoutConfig

Size = tuple[int, int]  # (height, width)
Box = tuple[int, int, int, int]  # (top, left, height, width)
Pad = tuple[int, int, int, int]  # (top, left, bottom, right), zeros (black before normalization)


@dataclass(frozen=True)
class Step:
    """One pixel operation on the image so far: cut ``box`` (None: all of it), resize to ``size`` (None:
    keep the size) with the processor's filter, then pad with black by ``pad``."""

    box: Box | None = None
    size: Size | None = None
    pad: Pad = (0, 0, 0, 0)


@dataclass(frozen=True)
class Crop:
    """One image the tower sees: the :class:`Step` s from the original image to it; ``role`` says what it
    is (``"image"``, ``"base"``, ``"tile"``, ``"global"``), ``position`` its (row, column) among the tiles."""

    steps: tuple[Step, ...]
    role: str = "image"
    position: tuple[int, int] | None = None


Sizes = Sequence[Sequence[int]]  # (height, width) of each image of a batch
Learned = dict[str, torch.Tensor] | None  # a layout's parameters by name (``image_newline``)
Packed = tuple[torch.Tensor, torch.Tensor]  # (sum of tokens, D) and each image's count
Segment = int | str  # a run of that many image placeholders, or text tokenized with special tokens parsed


@dataclass(frozen=True)
class ImagePlan:
    """Everything a layout decides for one image size: the crops in the order the tower sees them, the tile
    grid (rows, cols; (0, 0) when the image is not tiled), the decoder tokens the crops' features become,
    and the prompt's segments for the image: placeholder runs (ints) summing to ``num_tokens``, and text
    between them (strs, tokenized with special tokens parsed: Idefics3's ``"<fake_token_around_image>"``,
    ``"<row_1_col_1>"`` and ``"\\n"``, Gemma 3's ``"<start_of_image>"``)."""

    image_size: Size
    crops: tuple[Crop, ...]
    num_tokens: int
    prompt: tuple[Segment, ...]
    tiles: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        placeholders = sum(s for s in self.prompt if isinstance(s, int))
        if placeholders != self.num_tokens:
            raise ValueError(
                f"plan for a {self.image_size[0]}x{self.image_size[1]} image holds {placeholders} "
                f"placeholders in its prompt for {self.num_tokens} image tokens"
            )

    def text(self, image_token: str) -> str:
        """The image's prompt as one string, each placeholder written as ``image_token``: what transformers'
        processors put in place of the image's marker (tokenize it with the rest of the prompt, at once)."""
        return "".join(s if isinstance(s, str) else image_token * s for s in self.prompt)


def segments(*parts: Segment) -> tuple[Segment, ...]:
    """``parts`` with adjacent strings joined and empty strings dropped (an :class:`ImagePlan`'s prompt)."""
    out: list[Segment] = []
    for part in parts:
        if isinstance(part, str) and out and isinstance(out[-1], str):
            out[-1] += part
        elif part != "":
            out.append(part)
    return tuple(out)


@dataclass(frozen=True)
class CropShape:
    """What one crop is to the model: its pixel ``size`` (the tower's input), the decoder ``tokens`` the
    connector makes of it, and their (rows, cols) ``grid`` when they lie on one, row-major (None for a
    connector with learned queries)."""

    size: Size
    tokens: int
    grid: Size | None = None

    def __post_init__(self) -> None:
        size = _size(self.size, "crop size")
        object.__setattr__(self, "size", size)
        if not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"a crop's token count must be a positive int, got {self.tokens!r}")
        if self.grid is not None:
            grid = _size(self.grid, "crop token grid")
            if grid[0] * grid[1] != self.tokens:
                raise ValueError(
                    f"a {grid[0]}x{grid[1]} crop token grid holds {grid[0] * grid[1]} tokens, "
                    f"not {self.tokens}"
                )
            object.__setattr__(self, "grid", grid)

    @classmethod
    def of(cls, connector: Any, image_size: Sequence[int], grid: Sequence[int]) -> CropShape:
        """The crop shape of a tower that takes ``image_size`` (height, width) pixels to a ``grid`` of
        patch tokens, followed by ``connector`` (a :class:`~connectors.base.Connector`)."""
        grid = (int(grid[0]), int(grid[1]))
        return cls(tuple(image_size), connector.num_tokens(grid), connector.output_grid(grid))


def _size(value: Any, what: str) -> Size:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{what} must be a positive int or (height, width), got {value!r}")
    return pair  # type: ignore[return-value]


class TokenCountError(ValueError):
    """The prompt holds another number of image placeholders than an image's features give."""


class ImageLayout:
    """How an image becomes crops and decoder tokens; a registered subclass per scheme.

    Built for one :class:`CropShape` (the tower's input size and the connector's tokens per crop) and the
    scheme's options. Subclasses implement ``_plan``; those whose tokens are not simply the crops' tokens in
    crop order also implement ``pack``, and ``learned`` when they need parameters of their own (LLaVA-NeXT's
    ``image_newline``). Layouts are plain picklable objects, usable in data-loader workers.
    """

    name: ClassVar[str] = ""

    def __init__(self, crop: CropShape, **options: Any) -> None:
        self.crop = crop
        self.options = options

    def _cached(self, method: str, key: Any) -> Any:
        """``getattr(self, method)(key)``, remembered for the last 4096 keys (image sizes); the caches are
        not pickled."""
        caches = self.__dict__.setdefault("_caches", {})
        if method not in caches:
            caches[method] = functools.lru_cache(maxsize=4096)(getattr(self, method))
        return caches[method](key)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_caches"}

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({self.name!r}, crop={self.crop}{opts})"

    @property
    def config(self) -> LayoutConfig:
        return LayoutConfig(self.name, dict(self.options))

    def resolved_options(self) -> dict[str, Any]:
        """The options with each default the layout filled in (``anyres``'s ``grid_pinpoints`` None: the
        pixel grids it uses): two layouts of one name, crop size and resolved options cut the same crops
        (what a feature cache compares)."""
        return dict(self.options)

    # ---------------------------------------------------------------- sizes and tokens
    def plan(self, image_size: Sequence[int]) -> ImagePlan:
        """The crops, token count and prompt segments of an image of ``image_size`` (height, width)."""
        return self._cached("_plan", _size(tuple(int(v) for v in image_size), "image size"))

    def _plan(self, image_size: Size) -> ImagePlan:
        raise NotImplementedError

    def num_tokens(self, image_size: Sequence[int]) -> int:
        """Decoder tokens (placeholders in the prompt) of one image of ``image_size`` (height, width)."""
        return self.plan(image_size).num_tokens

    def num_crops(self, image_size: Sequence[int]) -> int:
        return len(self.plan(image_size).crops)

    def check_counts(self, image_sizes: Sequence[Sequence[int]], prompt_counts: Sequence[int]) -> None:
        """Raise :class:`TokenCountError` naming both counts and the image size where the prompt's
        placeholders for an image differ from what this layout gives it."""
        if len(image_sizes) != len(prompt_counts):
            raise TokenCountError(
                f"{len(prompt_counts)} image(s) in the prompts, {len(image_sizes)} image(s) given"
            )
        for i, (size, found) in enumerate(zip(image_sizes, prompt_counts, strict=True)):
            expected = self.num_tokens(size)
            if int(found) != expected:
                raise TokenCountError(
                    f"image {i} ({int(size[0])}x{int(size[1])}, layout {self.name!r}) gives {expected} image "
                    f"tokens, the prompt holds {int(found)} placeholders for it"
                )

    def text_tokens(self) -> tuple[str, ...]:
        """The special tokens the text of this layout's prompts may hold (Idefics3's
        ``"<fake_token_around_image>"``, Gemma 3's ``"<start_of_image>"``), each of which the decoder's
        tokenizer must hold as one token; none for a layout whose prompt is placeholders alone."""
        return ()

    # ---------------------------------------------------------------- pixels (data-loader side)
    def crops(self, image: Any, processor: ImageProcessor) -> tuple[torch.Tensor, Size]:
        """The crops of one image (any input the processor takes) as ``(num_crops, 3, H, W)`` float32 (a
        view of a channel-first buffer: ``torch.cat`` / ``stack`` them in the collate), with ``processor``'s
        backend, filter and statistics, and the decoded image's (height, width), which picks the plan (and
        which the model's ``pack`` takes again)."""
        if tuple(processor.size) != self.crop.size:
            raise ValueError(
                f"layout {self.name!r} makes {self.crop.size[0]}x{self.crop.size[1]} crops; the processor "
                f"makes {processor.size[0]}x{processor.size[1]} images"
            )
        rgb = backends.rgb_array(
            image,
            backend=processor.backend,
            do_convert_rgb=processor.do_convert_rgb,
            max_pixels=processor.max_pixels,
        )  # (H, W, 3) uint8
        plan = self.plan(rgb.shape[:2])
        arrays = run_steps(rgb, [c.steps for c in plan.crops], processor.backend, processor.resample)
        # one rescale-normalize over the crops stacked into one tall image (elementwise: the same numbers)
        tall = dataclasses.replace(processor, do_resize=False)(np.concatenate(arrays))  # (1, 3, n * H, W)
        height, width = self.crop.size
        pixels = tall.view(3, len(arrays), height, width).transpose(0, 1)  # (n, 3, H, W), a view
        return pixels, plan.image_size

    # ---------------------------------------------------------------- tokens (model side)
    def learned(self, dim: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the parameters the model keeps for this layout, for decoder width ``dim``."""
        return {}

    def pack(self, features: torch.Tensor, image_sizes: Sizes, learned: Learned = None) -> Packed:
        """Connector outputs of every crop of a batch, ``(sum of crops, tokens per crop, D)`` in image order,
        -> the images' decoder tokens one after the other ``(sum of tokens, D)`` and each image's count
        ``(num_images,)``. Here: the crops' tokens in crop order."""
        counts = [self.num_crops(s) for s in image_sizes]
        check_crops(self.name, features, counts, self.crop.tokens)
        lengths = torch.tensor([n * self.crop.tokens for n in counts], dtype=torch.long)
        return features.reshape(-1, features.shape[-1]), lengths


def check_crops(name: str, features: torch.Tensor, counts: Sequence[int], tokens: int) -> None:
    """Refuse crop features whose number of crops or tokens per crop differ from the plans'."""
    if features.ndim != 3 or features.shape[0] != sum(counts) or features.shape[1] != tokens:
        raise ValueError(
            f"layout {name!r}: expected features (crops={sum(counts)}, tokens={tokens}, D) for images of "
            f"{list(counts)} crops, got {tuple(features.shape)}"
        )


# ------------------------------------------------------------------------------ running the steps
def run_steps(
    rgb: np.ndarray, chains: Sequence[tuple[Step, ...]], backend: str, resample: str
) -> list[np.ndarray]:
    """Each chain of steps applied to ``rgb`` (H, W, 3) uint8 -> (h, w, 3) uint8; a prefix shared by
    several chains (the resized and padded canvas of the tiles) runs once."""
    done: dict[tuple[Step, ...], np.ndarray] = {(): rgb}

    def run(steps: tuple[Step, ...]) -> np.ndarray:
        if steps not in done:
            done[steps] = apply_step(run(steps[:-1]), steps[-1], backend, resample)
        return done[steps]

    return [np.ascontiguousarray(run(tuple(chain))) for chain in chains]


def apply_step(rgb: np.ndarray, step: Step, backend: str, resample: str) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8: box, resize, pad."""
    if step.box is not None:
        top, left, height, width = step.box
        if top < 0 or left < 0 or top + height > rgb.shape[0] or left + width > rgb.shape[1]:
            raise ValueError(f"crop box {step.box} lies outside a {rgb.shape[0]}x{rgb.shape[1]} image")
        rgb = rgb[top : top + height, left : left + width]
    if step.size is not None:
        rgb = resize_rgb(np.ascontiguousarray(rgb), step.size, backend, resample)
    if any(step.pad):
        top, left, bottom, right = step.pad
        rgb = np.pad(rgb, ((top, bottom), (left, right), (0, 0)))
    return rgb


def resize_rgb(rgb: np.ndarray, size: Size, backend: str, resample: str) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8 with ``backend``'s resize (torchvision's antialiased
    interpolate on uint8, or Pillow), as transformers' image processors resize before rescaling."""
    if tuple(rgb.shape[:2]) == tuple(size):
        return rgb
    if backend == "pil":
        image = Image.fromarray(rgb).resize((size[1], size[0]), resample=backends.resample_code(resample))
        return np.asarray(image)
    x = torch.from_numpy(rgb).permute(2, 0, 1)  # (3, H, W) channels-last, as torchvision's pil_to_tensor
    return backends.resize_uint8(x, size, resample).permute(1, 2, 0).numpy()
