"""Image layouts: the registry, ``fixed``, and ``anyres`` / ``anyres_max_9`` against transformers'
LLaVA-NeXT and LLaVA-OneVision processors (token counts, crop pixels bit for bit with the same backend) and
``pack_image_features`` (decoder tokens from crop features, forward and backward)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.testing import assert_close

from connectors import build_connector
from connectors.layouts import (
    CropShape,
    LayoutConfig,
    LayoutOptionError,
    Step,
    TokenCountError,
    build_layout,
    list_layouts,
)
from connectors.layouts.anyres import linear_taps
from tests.helpers import anyres_reference as R
from vision_tower import ImageProcessor

TILE, PATCH = 28, 14  # a 2x2 token grid per crop: small enough to sweep fast, what transformers takes
SIDE = TILE // PATCH
CROP = CropShape((TILE, TILE), SIDE * SIDE, (SIDE, SIDE))
NEXT_PINS = [[r * TILE, c * TILE] for r, c in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]  # largest 84 px
OV_PINS = [[r * TILE, c * TILE] for r in range(1, 7) for c in range(1, 7)]  # largest 168x168
RATIOS = (1 / 4, 1 / 3, 1 / 2, 2 / 3, 1, 3 / 2, 2, 3, 4)
SHORT = (9, 23, 41, 77, 131, 211)  # below one tile .. above the largest pinpoint
SIZES = [
    (s, round(s * r)) if r >= 1 else (round(s / r), s) for s in SHORT for r in RATIOS
]  # 54 sizes (h, w), from 1:4 to 4:1
SIZES += [(5, 17), (29, 28), (85, 250), (169, 170), (400, 101), (257, 769)]
SIZES += [(49, 49), (98, 147), (47, 188)]  # h * cols / w lands a hair below a whole number (rounded)
SIZES += [(5, 400), (400, 5), (3, 1000)]  # beyond 1:4: no row (or column) of tile tokens survives unpadding
SIZES += [(113, 85), (85, 113)]  # anyres_max_9 shrinks one axis by a whole odd factor (taps of weight 0)


def _image(size, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------- registry
def test_registry_lists_layouts_and_refuses_unknown_names_options_and_bad_pinpoints():
    assert {"fixed", "anyres", "anyres_max", "anyres_max_9"} <= set(list_layouts())
    with pytest.raises(KeyError, match=r"'tiles'.*anyres.*fixed"):
        build_layout("tiles", CROP)
    with pytest.raises(LayoutOptionError, match=r"unknown option\(s\) \['max_tile'\].*max_tiles"):
        build_layout("anyres_max", CROP, max_tile=4)
    with pytest.raises(LayoutOptionError, match="max_tiles='9'"):
        build_layout("anyres_max", CROP, max_tiles="9")
    with pytest.raises(ValueError, match="anyres_max_9.*fixes"):
        build_layout("anyres_max_9", CROP, max_tiles=4)
    with pytest.raises(ValueError, match=r"\[28, 50\] is not a multiple of the 28 px tile"):
        build_layout("anyres", CROP, grid_pinpoints=[[28, 56], [28, 50]])
    with pytest.raises(ValueError, match="without one.*keeps the token grid"):
        build_layout("anyres", CropShape((TILE, TILE), 16))
    with pytest.raises(ValueError, match="square crops"):
        build_layout("anyres", CropShape((28, 56), 8, (2, 4)))
    with pytest.raises(ValueError, match="makes 28x28 crops; the processor makes 32x32 images"):
        build_layout("fixed", CROP).crops(_image((10, 10), 0), ImageProcessor(image_size=32))


def test_config_round_trip_and_pickled_layouts_give_the_same_plans():
    for name, options in (("anyres", {"grid_pinpoints": [[28, 56], [56, 28]]}), ("anyres_max_9", {})):
        layout = build_layout(name, CROP, **options)
        config = LayoutConfig.from_dict(layout.config.to_dict())
        again = config.build(CROP)
        layout.plan((40, 100)), layout.packing((40, 100))  # fill the caches before pickling
        copied = pickle.loads(pickle.dumps(layout))  # a data-loader worker's copy
        for size in ((40, 100), (300, 90)):
            assert again.plan(size) == layout.plan(size) == copied.plan(size)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['option'\]"):
        LayoutConfig.from_dict({"name": "anyres", "option": {}})


@pytest.mark.parametrize(
    ("name", "options", "grid"),
    [
        ("mlp2x_gelu", {}, (6, 4)),
        ("pixel_shuffle", {"factor": 2}, (3, 2)),
        ("avg_pool", {"tokens_per_side": 2}, (2, 2)),
        ("resampler", {"num_queries": 5, "num_heads": 2}, None),
    ],
)
def test_crop_shape_of_each_connector_is_what_its_forward_gives(name, options, grid):
    connector = build_connector(name, 16, 8, **options)
    shape = CropShape.of(connector, (84, 56), (6, 4))  # a 6x4 patch grid (patch 14)
    out = connector(torch.randn(2, 24, 16), (6, 4))
    assert shape == CropShape((84, 56), out.shape[1], grid)
    if grid is None:
        with pytest.raises(ValueError, match="without one"):
            build_layout("anyres", CropShape.of(connector, (56, 56), (4, 4)))


# ---------------------------------------------------------------------------- fixed
@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_fixed_is_the_tower_processor_squash(backend):
    processor = ImageProcessor(image_size=TILE, backend=backend)
    layout = build_layout("fixed", CROP)
    for size in ((9, 40), (100, 31)):
        image = _image(size, 1)
        assert layout.num_tokens(size) == SIDE * SIDE
        pixels, image_size = layout.crops(image, processor)
        assert image_size == size and torch.equal(pixels, processor(image))


# ---------------------------------------------------------------------------- anyres by hand
def test_anyres_plan_by_hand():
    layout = build_layout("anyres", CROP)
    # 40x100 fits 28x84 (3 tiles) at scale 0.7 -> 28x70, 7 px of black each side; its 2x6 token grid
    # keeps all 6 columns (100 * 2/40 = 5 columns of image, (6 - 5) // 2 = 0 cut); 4 + 12 + 2 newlines
    plan = layout.plan((40, 100))
    assert plan.tiles == (1, 3) and plan.num_tokens == 18 and plan.prompt == (18,)
    assert plan.crops[0].steps == (Step(size=(28, 28)),) and plan.crops[0].role == "base"
    canvas = Step(size=(28, 70), pad=(0, 7, 0, 7))
    assert [c.steps for c in plan.crops[1:]] == [(canvas, Step(box=(0, 28 * i, 28, 28))) for i in range(3)]
    # a 10x10 image: every pinpoint keeps its 100 pixels, 28x56 wastes fewest; the 2x4 grid keeps its
    # middle 2x2 (10 * 2/10 = 2 columns): 4 + 4 + 2
    assert layout.plan((10, 10)).tiles == (1, 2) and layout.num_tokens((10, 10)) == 10
    # anyres_max_9: a 168x168 image is 6x6 tiles, a 12x12 grid, sqrt(144 / (9 * 4)) = 2 -> 6x6: 4 + 36 + 6
    assert build_layout("anyres_max_9", CROP).num_tokens((168, 168)) == 46
    assert build_layout("anyres_max", CROP, max_tiles=36).num_tokens((168, 168)) == 4 + 144 + 12


def test_a_prompt_with_another_token_count_is_an_error_naming_both_counts_and_the_size():
    layout = build_layout("anyres", CROP)
    layout.check_counts([(40, 100), (10, 10)], [18, 10])
    with pytest.raises(TokenCountError, match=r"image 1 \(10x10, layout 'anyres'\) gives 10 .* holds 9"):
        layout.check_counts([(40, 100), (10, 10)], [18, 9])


# ---------------------------------------------------------------------------- parity with transformers
def _reference(name, backend):
    if name == "anyres":
        return R.llava_next_processor(backend, TILE, PATCH, NEXT_PINS), build_layout("anyres", CROP)
    processor = R.llava_onevision_processor(backend, TILE, PATCH, OV_PINS, max_tiles=9)
    return processor, build_layout("anyres_max_9", CROP)


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("name", ["anyres", "anyres_max_9"])
def test_token_counts_and_crops_equal_transformers_processors(name, backend):
    reference, layout = _reference(name, backend)
    processor = ImageProcessor(image_size=TILE, backend=backend)
    pins = NEXT_PINS if name == "anyres" else OV_PINS
    assert any(h < TILE and w < TILE for h, w in SIZES)
    assert any(h > max(p[0] for p in pins) and w > max(p[1] for p in pins) for h, w in SIZES)
    image_token = reference.tokenizer.convert_tokens_to_ids(R.IMAGE)
    counts = []
    for i, size in enumerate(SIZES):
        image = _image(size, i)
        out = reference(images=image, text=R.IMAGE, return_tensors="pt")
        expected = int((out["input_ids"] == image_token).sum())
        assert layout.num_tokens(size) == expected, size
        pixels, image_size = layout.crops(image, processor)
        assert image_size == size and torch.equal(pixels, out["pixel_values"][0]), size
        counts.append(expected)
    layout.check_counts(SIZES, counts)
    if name == "anyres_max_9":  # the sweep reaches the shrinking
        full = build_layout("anyres_max", CROP, max_tiles=36)
        assert sum(layout.num_tokens(s) < full.num_tokens(s) for s in SIZES) >= 10


@pytest.mark.parametrize("name", ["anyres", "anyres_max_9"])
def test_pack_equals_transformers_pack_image_features_forward_and_backward(name):
    dim = 8
    layout = build_layout(name, CROP)
    crops = [layout.num_crops(s) for s in SIZES]
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(sum(crops), SIDE * SIDE, dim, generator=gen, requires_grad=True)
    newline = torch.randn(dim, generator=gen, requires_grad=True)
    ref_features = features.detach().clone().requires_grad_()
    ref_newline = newline.detach().clone().requires_grad_()

    out, lengths = layout.pack(features, SIZES, {"image_newline": newline})
    per_image = list(torch.split(ref_features, crops))
    if name == "anyres":
        ref, ref_lengths = R.pack_llava_next(
            per_image, SIZES, ref_newline, tile=TILE, patch=PATCH, pinpoints=NEXT_PINS
        )
    else:
        ref, ref_lengths = R.pack_llava_onevision(
            per_image, SIZES, ref_newline, tile=TILE, patch=PATCH, pinpoints=OV_PINS, max_tiles=9
        )
    assert lengths.tolist() == ref_lengths.tolist() == [layout.num_tokens(s) for s in SIZES]
    assert_close(out, ref, atol=1e-6, rtol=1e-6)
    if name == "anyres":  # nothing shrunk: tokens are copied
        assert torch.equal(out, ref)
    weights = torch.randn(out.shape, generator=gen)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    assert_close(features.grad, ref_features.grad, atol=1e-6, rtol=1e-6)
    assert_close(newline.grad, ref_newline.grad, atol=1e-5, rtol=1e-6)


def test_shrinking_taps_are_torch_bilinear_weights_bit_for_bit():
    """Every (size_in -> size_out) shrink up to 50: the two taps per output position equal the weights
    ``F.interpolate(mode="bilinear")`` applies (read off by interpolating one-hot rows)."""
    for size_in in range(2, 50):
        eye = torch.eye(size_in)[None, :, :, None].expand(1, size_in, size_in, 2).contiguous()  # (1, C, H, 2)
        for size_out in range(1, size_in):
            torch_weights = F.interpolate(eye, [size_out, 2], mode="bilinear")[0, :, :, 0]  # (in, out)
            ours = torch.zeros(size_in, size_out)
            for index, weight in linear_taps(size_in, size_out):
                ours[torch.from_numpy(index), torch.arange(size_out)] += torch.from_numpy(weight)
            assert torch.equal(ours, torch_weights), (size_in, size_out)


def test_pack_refuses_features_that_do_not_match_the_plans():
    layout = build_layout("anyres", CROP)
    features = torch.zeros(4, SIDE * SIDE, 8)  # 40x100 has 4 crops, 10x10 has 3
    with pytest.raises(ValueError, match=r"crops=7, tokens=4.*\[4, 3\].*\(4, 4, 8\)"):
        layout.pack(features, [(40, 100), (10, 10)], {"image_newline": torch.zeros(8)})
    with pytest.raises(ValueError, match="image_newline"):
        layout.pack(features, [(40, 100)])
