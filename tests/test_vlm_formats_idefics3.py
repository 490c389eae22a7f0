"""Idefics3 and SmolVLM checkpoints (the ``split`` image layout): out to transformers' model classes and
``AutoProcessor`` as saved, back again, and the refusals."""

from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from connectors import FormatError, VisionLanguageModel
from tests.helpers import split_pan_reference as S
from tests.helpers import vlm_reference as R
from vision_tower import ImageProcessor

LOGITS = dict(atol=1e-4, rtol=1e-4)
TILE = 32  # R.tower(): 32 px crops of 4x4 patch tokens; pixel shuffle by 2: 4 tokens per crop
LONGEST_EDGE = 96  # up to 3x3 tiles
# (height, width): 1:3, 8:5, square and smaller than a tile (enlarged), 9:20, 10:3, a 3:20 panorama
SIZES = [(50, 150), (64, 40), (30, 30), (90, 200), (200, 60), (15, 100)]
PROMPT = "hi <image> hi"  # words of S.idefics3_tokenizer()


def _vlm(connector="pixel_shuffle", options=None, attention="causal", feature_layer=-1, layout="split"):
    """The tiny VLM with the split layout, a Llama decoder and a tokenizer holding Idefics3's tokens; the
    processor filters with Lanczos, as Idefics3ImageProcessor does."""
    tokenizer = S.idefics3_tokenizer()
    tower = R.tower(seed=7)
    tower.feature_layer = feature_layer
    vlm = VisionLanguageModel(
        tower,
        connector,
        R.decoder("llama", seed=3),
        connector_options={"factor": 2} if options is None else options,
        tokenizer=tokenizer,
        image_token_id=tokenizer.convert_tokens_to_ids(S.IDEFICS3_IMAGE),
        processor=ImageProcessor(image_size=TILE, resample="lanczos"),
        attention=attention,
        image_layout=layout,
        layout_options={"longest_edge": LONGEST_EDGE} if layout == "split" else {},
    ).eval()
    R.randomize_(vlm.connector, seed=8, scale=0.3)
    return vlm


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


def _auto_processor(folder):
    """transformers' AutoProcessor of the folder (SmolVLMProcessor wants ``num2words``, which spells video
    frame counts only and is not installed here)."""
    import transformers
    from transformers.models.smolvlm import processing_smolvlm

    with mock.patch.object(processing_smolvlm, "num2words", processing_smolvlm.num2words or str):
        return transformers.AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("fmt", ["idefics3", "smolvlm"])
def test_split_export_loads_in_transformers_with_its_processor_and_back(fmt, tmp_path):
    """transformers' model and AutoProcessor from the folder: the processor's ids and crops are ours, the
    logits and greedy continuations of a batch of six aspect ratios too; the folder reads back the same."""
    import transformers

    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[fmt]
    vlm = _vlm()
    out = tmp_path / fmt
    vlm.save_pretrained(out, format=fmt)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == fmt and cfg["scale_factor"] == 2
    assert cfg["vision_config"]["model_type"] == f"{fmt}_vision"
    hf = getattr(transformers, f"{prefix}ForConditionalGeneration").from_pretrained(out).eval()
    processor = _auto_processor(out)
    assert type(processor).__name__ == f"{prefix}Processor"
    assert type(processor.image_processor).__name__ == f"{prefix}ImageProcessor"
    processor.tokenizer.padding_side = "left"  # as ours lays a batch out
    images = _images()
    nested = [[image] for image in images]  # one image per prompt (SmolVLMProcessor takes no flat list)
    batch = processor(images=nested, text=[PROMPT] * len(images), return_tensors="pt", padding=True)

    pixels, sizes = vlm.image_inputs(images)
    counts = [vlm.layout.num_crops(s) for s in SIZES]
    # tiles 1x3, 3x2, 3x3 (a small image is enlarged), 2x3, 3x1, 1x3, and the global image
    assert counts == [4, 7, 10, 7, 4, 4], counts
    ours = R.our_prompt_batch(vlm, [PROMPT] * len(images), SIZES)
    assert torch.equal(batch["input_ids"], ours.input_ids)
    assert torch.equal(batch["attention_mask"], ours.attention_mask)
    start = 0
    for i, n in enumerate(counts):  # transformers pads each row's crops with empty images to the most
        assert torch.equal(batch["pixel_values"][i, :n], pixels[start : start + n]), SIZES[i]
        assert not batch["pixel_values"][i, n:].any()
        start += n
    assert start == pixels.shape[0]

    mine = R.assert_same_logits_and_greedy_tokens(
        hf, vlm, batch, pixels, sizes, prompts=[PROMPT] * len(images)
    )

    from connectors.describe import describe_vlm

    described = describe_vlm(out)  # `vision-tower info`, from the config files alone
    assert described.format == fmt and described.connector["options"] == vlm.connector.options
    assert described.image_tokens([SIZES[0]]) == {SIZES[0]: vlm.tokens_for(SIZES[0])}

    back = VisionLanguageModel.from_pretrained(out)
    assert back.image_layout.name == "split"
    assert (back.layout.longest_edge, back.layout.do_image_splitting) == (LONGEST_EDGE, True)
    assert back.connector.name == "pixel_shuffle" and back.connector.options == vlm.connector.options
    assert back.tower.feature_layer == -1 and back.attention == "causal"
    assert back.processor.size == (TILE, TILE) and back.processor.resample == "lanczos"
    assert back.image_token_id == vlm.image_token_id
    assert torch.equal(back.image_inputs(images)[0], pixels)
    with torch.no_grad():
        again = back(batch["input_ids"], pixels, batch["attention_mask"], image_sizes=sizes).logits
    assert_close(again, mine, atol=1e-6, rtol=1e-6)


def test_idefics3_checkpoint_made_by_transformers_loads(tmp_path):
    """An Idefics3ForConditionalGeneration with its processor as transformers saves them reads as the same
    model (its tower's bucketed positions become the plain table; a tied head)."""
    import transformers

    tokenizer = S.idefics3_tokenizer()
    text = R.decoder_config("llama", tie_word_embeddings=True).to_dict()
    vision = {k: v for k, v in R.hf_tower_config().items() if k not in ("vision_use_head", "model_type")}
    cfg = transformers.Idefics3Config(
        vision_config=vision,
        text_config=text,
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids(S.IDEFICS3_IMAGE),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    hf = R.randomize_(transformers.Idefics3ForConditionalGeneration(cfg).eval(), seed=4)
    hf.save_pretrained(tmp_path / "i3")
    reference = S.idefics3_processor("torchvision", TILE, 4, longest_edge=LONGEST_EDGE)
    reference.save_pretrained(tmp_path / "i3")
    vlm = VisionLanguageModel.from_pretrained(tmp_path / "i3")
    assert vlm.image_layout.name == "split" and vlm.layout.longest_edge == LONGEST_EDGE
    images = _images()[:4]
    batch = reference(images=images, text=[PROMPT] * 4, return_tensors="pt", padding=True)
    pixels, sizes = vlm.image_inputs(images)
    mask = batch["attention_mask"]
    with torch.no_grad():
        theirs = hf(**batch).logits
        mine = vlm(batch["input_ids"], pixels, mask, image_sizes=sizes).logits
    assert_close(mine[mask.bool()], theirs[mask.bool()], **LOGITS)


@pytest.mark.parametrize(
    "fmt, change, words",
    [
        ("idefics3", dict(layout="fixed"), ["'fixed'", "format='llava'", "native"]),
        ("smolvlm", dict(connector="linear", options={}), ["'linear'", "native"]),
        ("idefics3", dict(options={"factor": 2, "depth": 2}), ["'pixel_shuffle'", "depth=1", "native"]),
        ("smolvlm", dict(options={"factor": 2, "bias": True}), ["bias=False", "native"]),
        ("idefics3", dict(attention="prefix"), ["prefix attention", "attention='causal'", "native"]),
        ("smolvlm", dict(feature_layer=-2), ["feature_layer=-2", "native"]),
    ],
)
def test_split_formats_refuse_what_they_cannot_express(fmt, change, words, tmp_path):
    vlm = _vlm(**change)
    with pytest.raises(FormatError) as err:
        vlm.save_pretrained(tmp_path / "x", format=fmt)
    message = str(err.value)
    assert all(w in message for w in words), message
    assert not (tmp_path / "x").exists()


def test_split_formats_refuse_other_decoders_and_a_tiled_llava_layout_names_them(tmp_path):
    """A Qwen2 decoder is refused; a split VLM saved as LLaVA-NeXT is told to save idefics3 or smolvlm."""
    tokenizer = S.idefics3_tokenizer()
    vlm = VisionLanguageModel(
        R.tower(seed=7),
        "pixel_shuffle",
        R.decoder("qwen2"),
        tokenizer=tokenizer,
        image_token_id=tokenizer.convert_tokens_to_ids(S.IDEFICS3_IMAGE),
        processor=ImageProcessor(image_size=TILE, resample="lanczos"),
        attention="causal",
        image_layout="split",
    )
    with pytest.raises(FormatError, match="'qwen2'.*format='native'"):
        vlm.save_pretrained(tmp_path / "q", format="smolvlm")
    names = "format='idefics3' or format='smolvlm' or format='native'"
    with pytest.raises(FormatError, match=f"'split'.*{names}"):
        vlm.save_pretrained(tmp_path / "n", format="llava_next")


def test_split_formats_refuse_a_tower_grid_idefics3_buckets_to_other_positions(tmp_path):
    """A 19x19 patch grid: Idefics3's float32 bucketing reads some neighbours' position rows (the plain
    table the tower adds cannot be written)."""
    from vision_tower.formats.idefics3 import position_rows

    assert not torch.equal(position_rows(19, 19), torch.arange(19))  # the reference lookup, independently
    tokenizer = S.idefics3_tokenizer()
    vlm = VisionLanguageModel(
        R.tower(seed=7, image_size=19 * 8),
        "pixel_shuffle",
        R.decoder("llama"),
        connector_options={"factor": 1},
        tokenizer=tokenizer,
        image_token_id=tokenizer.convert_tokens_to_ids(S.IDEFICS3_IMAGE),
        processor=ImageProcessor(image_size=19 * 8, resample="lanczos"),
        attention="causal",
        image_layout="split",
    )
    with pytest.raises(FormatError, match="19x19 patch grid.*format='native'"):
        vlm.save_pretrained(tmp_path / "x", format="idefics3")
