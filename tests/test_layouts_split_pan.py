"""Image layouts ``split`` (Idefics3 / SmolVLM) and ``pan_and_scan`` (Gemma 3) against transformers'
``Idefics3Processor`` / ``SmolVLMProcessor`` and ``Gemma3Processor(do_pan_and_scan=True)`` built locally:
crop pixels bit for bit with the same backend, the text put in place of the image's marker character for
character, the prompt's ids and placeholder counts, on a sweep of image sizes from 1:4 to 4:1 (and beyond)."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from connectors import build_connector
from connectors.layouts import CropShape, LayoutConfig, Step, build_layout, list_layouts
from connectors.layouts.base import segments
from tests.helpers import split_pan_reference as R
from vision_tower import ImageProcessor

TILE, PATCH = 56, 14  # a 4x4 patch grid per crop
SHUFFLE = CropShape.of(build_connector("pixel_shuffle", 16, 8, factor=2), (TILE, TILE), (4, 4))  # Idefics3's
POOL = CropShape.of(build_connector("avg_pool", 16, 8, tokens_per_side=2), (TILE, TILE), (4, 4))  # Gemma 3's
LONGEST = 4 * TILE  # Idefics3's default longest_edge: 4 tiles
PAN = {"min_crop_size": 32, "max_num_crops": 4, "min_ratio_to_activate": 1.2}
PAN_KWARGS = {"do_pan_and_scan": True, **{f"pan_and_scan_{k}": v for k, v in PAN.items()}}
RATIOS = (1 / 4, 1 / 3, 1 / 2, 2 / 3, 1, 3 / 2, 2, 3, 4)
SHORT = (7, 30, 57, 90, 150, 260)  # below one tile .. above the longest edge (224) and beyond
SIZES = [(s, round(s * r)) if r >= 1 else (round(s / r), s) for s in SHORT for r in RATIOS]  # 54, 1:4 .. 4:1
SIZES += [(56, 56), (57, 55), (5, 17), (1000, 300), (111, 223)]  # one tile; odd sides; far above
SIZES += [
    (100, 120),
    (100, 119),
    (120, 100),
    (33, 95),
    (20, 70),
    (50, 300),
    (300, 50),
    (100, 350),
]  # pan and scan's edges


def _image(size, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def test_crop_tokens_are_idefics3_and_gemma3_image_seq_len():
    # Idefics3: int(((image_size // patch_size) ** 2) / (scale_factor ** 2)); Gemma 3: tokens_per_side ** 2
    assert SHUFFLE.tokens == int((TILE // PATCH) ** 2 / 2**2) == 4 and POOL.tokens == 4


# ---------------------------------------------------------------------------- registry and options
@pytest.mark.parametrize(
    ("name", "crop", "options", "error", "words"),
    [
        ("split", CropShape((56, 28), 2, (2, 1)), {}, ValueError, "square crops"),
        ("split", SHUFFLE, {"longest_edge": 0}, ValueError, "longest_edge must be a positive int, got 0"),
        ("split", SHUFFLE, {"longest_edge": 150.0}, ValueError, "must be a positive int, got 150.0"),
        ("split", SHUFFLE, {"do_image_splitting": "yes"}, TypeError, "splitting='yes': expected bool"),
        ("pan_and_scan", POOL, {"max_num_crops": 1}, ValueError, "max_num_crops must be at least 2, got 1"),
        ("pan_and_scan", POOL, {"min_crop_size": 0}, ValueError, "min_crop_size must be at least 1, got 0"),
        ("pan_and_scan", POOL, {"min_ratio_to_activate": "1.2"}, TypeError, "='1.2': expected float"),
        ("pan_and_scan", POOL, {"max_crops": 3}, TypeError, r"option\(s\) \['max_crops'\].*max_num_crops"),
    ],
)
def test_bad_options_are_refused_naming_them(name, crop, options, error, words):
    with pytest.raises(error, match=words):
        build_layout(name, crop, **options)


def test_registry_and_config_round_trip():
    assert {"split", "pan_and_scan"} <= set(list_layouts())
    for name, crop, options in (("split", SHUFFLE, {"longest_edge": 150}), ("pan_and_scan", POOL, PAN)):
        layout = build_layout(name, crop, **options)
        again = LayoutConfig.from_dict(layout.config.to_dict()).build(crop)
        copied = pickle.loads(pickle.dumps(layout))  # a data-loader worker's copy
        for size in ((40, 100), (300, 90)):
            assert again.plan(size) == layout.plan(size) == copied.plan(size)


def test_pan_and_scan_refuses_an_empty_crop():
    # 2x9 at min_crop_size 2: 4 crops of 3 columns, the last one starts at column 9 (transformers'
    # torchvision processor fails on it, its PIL one resizes an empty image)
    with pytest.raises(ValueError, match=r"empty crop at \(0, 9\) out of a 2x9 image.*min_crop_size"):
        build_layout("pan_and_scan", POOL, min_crop_size=2).plan((2, 9))


def test_lanczos_without_torch_support_names_the_fix(monkeypatch):
    from vision_tower import backends

    monkeypatch.setattr(backends, "_torch_has_lanczos", lambda: False)
    processor = ImageProcessor(image_size=TILE, backend="torchvision", resample="lanczos")
    with pytest.raises(ValueError, match="lanczos interpolate.*upgrade torch or use backend='pil'"):
        build_layout("split", SHUFFLE).crops(_image((30, 40), 0), processor)


# ---------------------------------------------------------------------------- plans by hand
def test_split_plan_by_hand():
    layout = build_layout("split", SHUFFLE)
    # 100x400: longest edge 400 -> 224, 224 / 4 = 56 rows; 56x224 is 1x4 tiles, then the global image
    plan = layout.plan((100, 400))
    assert plan.tiles == (1, 4) and len(plan.crops) == 5 and plan.num_tokens == 20
    resized = Step(size=(56, 224))
    assert [c.steps for c in plan.crops] == [
        *((resized, resized, Step(box=(0, 56 * i, 56, 56))) for i in range(4)),
        (resized, resized, Step(size=(56, 56))),
    ]
    assert [c.role for c in plan.crops] == ["tile"] * 4 + ["global"]
    fake = "<fake_token_around_image>"
    assert plan.prompt == (
        f"{fake}<row_1_col_1>", 4, f"{fake}<row_1_col_2>", 4, f"{fake}<row_1_col_3>", 4,
        f"{fake}<row_1_col_4>", 4, f"\n\n{fake}<global-img>", 4, fake,
    )  # fmt: skip
    # 55x150 under longest_edge 150: 56x150 (55 rounded up to even), then 150 -> 168 and int(168 * 56 / 150)
    # = 62 rows -> 112: 2x3 tiles (transformers' get_number_of_image_patches says 1x3 from the 56 rows)
    assert build_layout("split", SHUFFLE, longest_edge=150).plan((55, 150)).tiles == (2, 3)
    # a 224 px longest edge of 50x50 gives 4x4 tiles; without splitting, one crop squashed after the resize
    single = build_layout("split", SHUFFLE, do_image_splitting=False).plan((50, 60))
    assert [c.steps for c in single.crops] == [(Step(size=(186, 224)), Step(size=(56, 56)))]
    assert single.prompt == (f"{fake}<global-img>", 4, fake) and single.tiles == (0, 0)
    # a longest edge of one tile: one crop, the global block alone
    assert build_layout("split", SHUFFLE, longest_edge=56).plan((300, 90)).prompt == single.prompt


def test_pan_and_scan_plan_by_hand():
    layout = build_layout("pan_and_scan", POOL, **PAN)
    # 1000x300: 1000/300 = 3.33 -> 3 crops of ceil(1000 / 3) = 334 rows, the last cut to 332
    plan = layout.plan((1000, 300))
    assert plan.tiles == (3, 1) and plan.num_tokens == 16
    assert [c.steps for c in plan.crops] == [
        (Step(size=(56, 56)),),
        *((Step(box=(334 * i, 0, min(334, 1000 - 334 * i), 300), size=(56, 56)),) for i in range(3)),
    ]
    block = ("\n\n<start_of_image>", 4, "<end_of_image>\n\n")
    assert layout.plan((100, 119)).prompt == block  # ratio 1.19 < 1.2: the whole image alone
    assert layout.plan((100, 120)).tiles == (1, 2)
    assert layout.plan((33, 95)).tiles == (1, 2)  # 2.88 -> 3, but 95 // 32 = 2
    assert layout.plan((20, 70)).tiles == (0, 0)  # 2 crops of 35x20: under 32 px
    assert layout.plan((50, 300)).tiles == (1, 4)  # 6 -> at most 4
    assert layout.plan((100, 350)).tiles == (1, 4)  # 3.5 rounds half up
    assert plan.prompt == segments(
        "Here is the original image ", *block, " and here are some crops to help you see better ",
        *block, " ", *block, " ", *block,
    )  # fmt: skip


# ---------------------------------------------------------------------------- parity with transformers
def _check_against(reference, layout, processor, marker, image_token, sizes, **kwargs):
    """Per size: the crops equal the reference's ``pixel_values`` bit for bit, the plan's text equals the
    text the reference puts in place of ``marker``, and tokenizing it gives the reference's ids. Returns the
    plans."""
    plans = []
    for i, size in enumerate(sizes):
        image = _image(size, i)
        out = reference(images=image, text=marker, return_tensors="pt", **kwargs)
        plan = layout.plan(size)
        text = plan.text(image_token)
        assert text == R.expanded_text(reference, image, marker, **kwargs), size
        ids = out["input_ids"][0]
        assert reference.tokenizer(text, return_tensors="pt")["input_ids"][0].tolist() == ids.tolist(), size
        image_id = reference.tokenizer.convert_tokens_to_ids(image_token)
        assert int((ids == image_id).sum()) == plan.num_tokens, size
        pixels, image_size = layout.crops(image, processor)
        expected = out["pixel_values"].reshape(-1, 3, TILE, TILE)  # Idefics3: (1, crops, 3, H, W)
        assert image_size == size and torch.equal(pixels, expected), size
        plans.append(plan)
    return plans


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_split_equals_idefics3_and_smolvlm_processors(family, backend):
    reference = R.idefics3_processor(
        backend, TILE, SHUFFLE.tokens, longest_edge=LONGEST, smolvlm=family == "smolvlm"
    )
    processor = ImageProcessor(image_size=TILE, backend=backend, resample="lanczos")  # Idefics3's filter
    layout = build_layout("split", SHUFFLE)
    assert any(h < TILE and w < TILE for h, w in SIZES) and any(min(s) > LONGEST for s in SIZES)
    plans = _check_against(reference, layout, processor, R.IDEFICS3_IMAGE, R.IDEFICS3_IMAGE, SIZES)
    assert {p.tiles for p in plans} >= {(1, 4), (4, 1), (2, 4), (4, 4), (3, 4)}


@pytest.mark.parametrize(
    ("backend", "options"),
    [
        ("torchvision", {"longest_edge": 150}),
        ("pil", {"longest_edge": 150}),
        ("torchvision", {"longest_edge": 56}),
    ]
    + [("pil", {"do_image_splitting": False})],
)
def test_split_options_equal_idefics3_processor(backend, options):
    """A longest edge that is not a whole number of tiles (the canvas rounds up), one of a single tile (no
    splitting) and ``do_image_splitting=False``, on every third size of the sweep."""
    layout = build_layout("split", SHUFFLE, **options)
    reference = R.idefics3_processor(
        backend,
        TILE,
        SHUFFLE.tokens,
        longest_edge=layout.longest_edge,
        do_image_splitting=layout.do_image_splitting,
    )
    processor = ImageProcessor(image_size=TILE, backend=backend, resample="lanczos")
    _check_against(reference, layout, processor, R.IDEFICS3_IMAGE, R.IDEFICS3_IMAGE, SIZES[::3])


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_pan_and_scan_equals_gemma3_processor(backend):
    reference = R.gemma3_processor(backend, TILE, POOL.tokens)
    processor = ImageProcessor(image_size=TILE, backend=backend, resample="bilinear")  # Gemma 3's filter
    layout = build_layout("pan_and_scan", POOL, **PAN)
    plans = _check_against(reference, layout, processor, R.GEMMA3_BOI, R.GEMMA3_IMAGE, SIZES, **PAN_KWARGS)
    # the sweep reaches: no pan and scan, 2, 3 and 4 crops side by side and stacked
    assert {p.tiles for p in plans} >= {(0, 0), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (4, 1)}


# ---------------------------------------------------------------------------- model side
def test_packed_tokens_land_where_idefics3_merges_image_features():
    """The base ``pack`` (crops' tokens in crop order) scattered over the placeholders of the plans' text
    equals ``Idefics3Model.inputs_merger`` on the processor's ids (two images in one prompt)."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Model

    reference = R.idefics3_processor("torchvision", TILE, SHUFFLE.tokens, longest_edge=LONGEST)
    layout = build_layout("split", SHUFFLE)
    sizes, marker = [(100, 400), (300, 90)], R.IDEFICS3_IMAGE
    images = [_image(s, i) for i, s in enumerate(sizes)]
    ids = reference(images=[images], text=f"hi {marker} hi {marker}", return_tensors="pt")["input_ids"]
    ours = reference.tokenizer("hi " + " hi ".join(layout.plan(s).text(marker) for s in sizes))["input_ids"]
    assert ours == ids[0].tolist()
    crops = sum(layout.num_crops(s) for s in sizes)
    features = torch.randn(crops, SHUFFLE.tokens, 8)  # the connector's output per crop, in plan order
    packed, lengths = layout.pack(features, sizes)
    assert lengths.tolist() == [20, 36]
    embeds = torch.randn(1, ids.shape[1], 8)
    owner = SimpleNamespace(config=SimpleNamespace(image_token_id=reference.image_token_id))
    expected = Idefics3Model.inputs_merger(owner, ids, embeds, features)
    placed = embeds.clone()
    placed[ids == reference.image_token_id] = packed
    assert torch.equal(placed, expected)
