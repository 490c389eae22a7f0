"""LLaVA-NeXT and LLaVA-OneVision checkpoints (tiled image layouts): out to transformers' model classes and
``AutoProcessor`` as saved, back again, and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from connectors import FormatError, VisionLanguageModel
from connectors.inputs import build_prompts
from tests.helpers import vlm_reference as R
from vision_tower import ImageProcessor

LOGITS = dict(atol=1e-4, rtol=1e-4)
TILE = 32  # R.tower(): 32 px crops of 4x4 tokens
NEXT_PINS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]  # largest 96 px
OV_PINS = [[r * TILE, c * TILE] for r in range(1, 7) for c in range(1, 7)]  # up to 6x6 tiles: shrinks
LAYOUTS = {
    "llava_next": ("anyres", {"grid_pinpoints": NEXT_PINS}),
    "llava_onevision": ("anyres_max_9", {"grid_pinpoints": OV_PINS}),
}
# (height, width): smaller than a tile, 2:5, 5:2, square, larger than every pinpoint (and 18 tiles for
# OneVision: shrunk), 36 tiles for OneVision (shrunk), a 3:20 panorama
SIZES = [(20, 13), (40, 100), (100, 40), (64, 64), (250, 90), (190, 170), (30, 200)]
# words of the tokenizer only: LlavaOnevisionProcessor counts the unknown token as "<video>" (which the
# tokenizer lacks) and refuses a prompt holding one
PROMPT = "USER: <image>\nwhat is this ASSISTANT:"


def _vlm(decoders, family, fmt, connector="mlp2x_gelu", attention="causal", feature_layer=-2, layout=None):
    tower = R.tower(seed=7)
    tower.feature_layer = feature_layer
    name, options = LAYOUTS[fmt] if layout is None else layout
    vlm = VisionLanguageModel(
        tower,
        connector,
        decoders[family],
        attention=attention,
        processor=ImageProcessor(image_size=TILE),
        image_layout=name,
        layout_options=options,
    )
    R.randomize_(vlm.connector, seed=8, scale=0.3)
    if "image_newline" in vlm.layout_params:  # a draw of its own, not the constructor's
        with torch.no_grad():
            vlm.layout_params["image_newline"].normal_(generator=torch.Generator().manual_seed(5))
    return vlm


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


@pytest.mark.parametrize(
    "fmt, family, connector",
    [
        ("llava_next", "qwen2", "mlp2x_gelu"),
        ("llava_next", "gemma", "linear"),
        ("llava_onevision", "qwen2", "mlp2x_gelu"),
        ("llava_onevision", "llama", "mlp2x_gelu"),
    ],
)
def test_tiled_llava_export_loads_in_transformers_with_its_processor_and_back(
    fmt, family, connector, decoders, tmp_path
):
    """transformers' model and AutoProcessor from the folder: the processor's ids and crops are ours, the
    logits and greedy continuations of a batch of seven aspect ratios too; the folder reads back the same."""
    import transformers

    hf_class = {
        "llava_next": transformers.LlavaNextForConditionalGeneration,
        "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,
    }[fmt]
    vlm = _vlm(decoders, family, fmt, connector)
    out = tmp_path / fmt
    vlm.save_pretrained(out, format=fmt)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == fmt and cfg["image_grid_pinpoints"] == LAYOUTS[fmt][1]["grid_pinpoints"]
    assert cfg.get("vision_aspect_ratio") == ("anyres_max_9" if fmt == "llava_onevision" else None)
    hf = hf_class.from_pretrained(out).eval()
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == hf_class.__name__.replace("ForConditionalGeneration", "Processor")
    processor.tokenizer.padding_side = "left"  # as ours lays a batch out
    images = _images()
    batch = processor(images=images, text=[PROMPT] * len(images), return_tensors="pt", padding=True)

    pixels, sizes = vlm.image_inputs(images)
    assert sizes.tolist() == batch["image_sizes"].tolist() == [list(s) for s in SIZES]
    ours = R.our_prompt_batch(vlm, [PROMPT] * len(images), SIZES)
    assert torch.equal(batch["input_ids"], ours.input_ids) and torch.equal(
        batch["attention_mask"], ours.attention_mask
    )
    start = 0
    for i, size in enumerate(SIZES):  # transformers pads each image's crops to the batch's most
        n = vlm.layout.num_crops(size)
        assert torch.equal(batch["pixel_values"][i, :n], pixels[start : start + n]), size
        start += n
    assert start == pixels.shape[0]
    if fmt == "llava_onevision":  # anyres_max_9 shrinks the token grids of the two largest images
        shrunk = [s for s in SIZES if vlm.layout.token_grid(s)[0][2:] != vlm.layout.token_grid(s)[1]]
        assert shrunk == [(250, 90), (190, 170)], shrunk

    mine = R.assert_same_logits_and_greedy_tokens(
        hf, vlm, batch, pixels, sizes, prompts=[PROMPT] * len(images)
    )

    back = VisionLanguageModel.from_pretrained(out)
    assert back.image_layout == vlm.image_layout  # name, pinpoints and max_tiles
    assert torch.equal(back.layout_params["image_newline"], vlm.layout_params["image_newline"])
    assert back.connector.name == ("linear" if connector == "linear" else "mlp")
    assert back.tower.feature_layer == -2 and back.processor.size == (TILE, TILE)
    with torch.no_grad():
        again = back(batch["input_ids"], pixels, batch["attention_mask"], image_sizes=sizes).logits
    assert_close(again, mine, atol=1e-6, rtol=1e-6)


def test_onevision_checkpoint_made_by_transformers_loads(tmp_path):
    """A LlavaOnevisionForConditionalGeneration and its processor as transformers saves them (do_pad true,
    vision_feature_layer -1, anyres_max_4) read as the same model."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tokenizer = R.tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    cfg = LlavaOnevisionConfig(
        vision_config=R.hf_tower_config(model_type="siglip_vision_model"),
        text_config=R.decoder_config("qwen2").to_dict(),
        image_token_index=image_token,
        vision_feature_layer=-1,  # the last block's raw output
        image_grid_pinpoints=OV_PINS,
        vision_aspect_ratio="anyres_max_4",
    )
    torch.manual_seed(0)
    hf = R.randomize_(LlavaOnevisionForConditionalGeneration(cfg).eval(), seed=4)
    hf.save_pretrained(tmp_path / "ov")
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": TILE, "width": TILE},
        image_grid_pinpoints=OV_PINS,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(),
        num_image_tokens=16,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_4",
    ).save_pretrained(tmp_path / "ov")
    image_processor.save_pretrained(tmp_path / "ov")  # preprocessor_config.json, as the hub's folders hold it
    assert json.loads((tmp_path / "ov" / "preprocessor_config.json").read_text())["do_pad"] is True
    vlm = VisionLanguageModel.from_pretrained(tmp_path / "ov")
    assert vlm.image_layout.name == "anyres_max" and vlm.image_layout.options["max_tiles"] == 4
    assert vlm.tower.feature_layer == 2 and vlm.processor.size == (TILE, TILE)
    images = _images()[3:6]
    pixels, sizes = vlm.image_inputs(images)
    ids = build_prompts(
        vlm.tokenizer,
        ["what is this"] * 3,
        image_token_id=vlm.image_token_id,
        num_image_tokens=[vlm.tokens_for(s) for s in sizes.tolist()],
        pad_token_id=0,
        causal=True,
    )
    mask = ids.attention_mask
    with torch.no_grad():
        theirs = hf(
            input_ids=ids.input_ids,
            pixel_values=pixels,
            image_sizes=sizes,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        ).logits
        mine = vlm(ids.input_ids, pixels, mask, image_sizes=sizes).logits
    assert_close(mine[mask.bool()], theirs[mask.bool()], **LOGITS)


@pytest.mark.parametrize(
    "fmt, family, layout, connector, attention, layer, words",
    [
        ("llava_next", "qwen2", "fixed", "linear", "causal", -2, ["'fixed'", "format='llava'", "'native'"]),
        (
            "llava_next",
            "qwen2",
            "onevision",
            "linear",
            "causal",
            -2,
            ["'anyres_max'", "format='llava_onevision'"],
        ),
        ("llava_onevision", "qwen2", "next", "linear", "causal", -2, ["'anyres'", "format='llava_next'"]),
        ("llava", "qwen2", "next", "linear", "causal", -2, ["'anyres'", "format='llava_next'"]),
        (
            "paligemma",
            "gemma",
            "onevision",
            "linear",
            "prefix",
            -1,
            ["'anyres_max'", "format='llava_onevision'"],
        ),
        ("llava_next", "llama", "next", "linear", "prefix", -2, ["prefix attention", "attention='causal'"]),
        (
            "llava_onevision",
            "qwen2",
            "onevision",
            "pixel_shuffle",
            "causal",
            -2,
            ["'pixel_shuffle'", "native"],
        ),
        ("llava_next", "llama", "next", "linear", "causal", -1, ["post-layernorm", "feature_layer=-2"]),
        ("llava_onevision", "gemma2", "onevision", "linear", "causal", -2, ["soft-capping", "native"]),
    ],
)
def test_tiled_formats_refuse_what_they_cannot_express(
    fmt, family, layout, connector, attention, layer, words, decoders, tmp_path
):
    chosen = {"fixed": ("fixed", {}), "next": LAYOUTS["llava_next"], "onevision": LAYOUTS["llava_onevision"]}
    vlm = _vlm(decoders, family, fmt, connector, attention, layer, layout=chosen[layout])
    with pytest.raises(FormatError) as err:
        vlm.save_pretrained(tmp_path / "x", format=fmt)
    message = str(err.value)
    assert all(w in message for w in words), message
    assert "format='paligemma'" not in message or layout == "fixed", message  # it holds no tiled layout
    assert not (tmp_path / "x").exists()
