"""Gemma 3 checkpoints (format ``gemma3``, image layouts ``fixed`` and ``pan_and_scan``): out to transformers'
``Gemma3ForConditionalGeneration`` and ``AutoProcessor`` (Gemma3Processor) as saved, back again, and the
refusals. The VLM's processor filters bilinearly, as Gemma3ImageProcessor does by default; the export writes
whatever filter the VLM's processor has."""

from __future__ import annotations

import json

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
TILE = 32  # R.tower(): 32 px crops of 4x4 patches, pooled to 2x2 = 4 tokens per crop
PAN = {"min_crop_size": 16, "max_num_crops": 4, "min_ratio_to_activate": 1.2}
# (height, width): 1:3 (3 crops), 8:5 (2), square (none), 2:5 (3), 4:1 (4), 9:10 (under the threshold)
SIZES = [(50, 150), (64, 40), (30, 30), (40, 100), (120, 30), (45, 50)]
CROPS = {"pan_and_scan": [3, 2, 0, 3, 4, 0], "fixed": [0] * len(SIZES)}
TEXT = f"Here {S.GEMMA3_BOI} is the image"  # Gemma3Processor's image marker is <start_of_image>


def _vlm(decoders, layout="pan_and_scan", *, connector="avg_pool", attention="image_bidirectional", **kw):
    """``kw``: ``family`` (the decoder's, default gemma3_text), ``feature_layer`` (-1), avg_pool options."""
    tokenizer = S.gemma3_tokenizer()
    tower = R.tower(seed=7)
    tower.feature_layer = kw.pop("feature_layer", -1)
    decoder = decoders[kw.pop("family", "gemma3_text")]
    options = {"tokens_per_side": 2, **kw} if connector == "avg_pool" else {}
    vlm = VisionLanguageModel(
        tower,
        connector,
        decoder,
        connector_options=options,
        tokenizer=tokenizer,
        image_token_id=tokenizer.convert_tokens_to_ids(S.GEMMA3_IMAGE),
        processor=ImageProcessor(image_size=TILE, resample="bilinear"),
        attention=attention,
        image_layout=layout,
        layout_options=PAN if layout == "pan_and_scan" else {},
    )
    R.randomize_(vlm.connector, seed=8, scale=0.3)
    return vlm.eval()


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


@pytest.mark.parametrize("layout", ["pan_and_scan", "fixed"])
def test_gemma3_export_loads_in_transformers_with_its_processor_and_back(layout, decoders, tmp_path):
    """transformers' model and AutoProcessor from the folder: the processor's crops (and, with pan and scan,
    ids) are ours; on the processor's ids and token_type_ids the logits and greedy continuations of a batch
    of six aspect ratios equal ours; the folder reads back the same."""
    import transformers

    vlm = _vlm(decoders, layout)
    out = tmp_path / layout
    vlm.save_pretrained(out, format="gemma3")
    cfg = json.loads((out / "config.json").read_text())
    boi, eoi = (vlm.tokenizer.convert_tokens_to_ids(t) for t in (S.GEMMA3_BOI, S.GEMMA3_EOI))
    assert (cfg["model_type"], cfg["mm_tokens_per_image"]) == ("gemma3", 4)
    assert (cfg["image_token_index"], cfg["boi_token_index"], cfg["eoi_token_index"]) == (
        vlm.image_token_id,
        boi,
        eoi,
    )
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(out).eval()
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "Gemma3Processor" and processor.image_seq_length == 4
    processor.tokenizer.padding_side = "left"  # as ours lays a batch out
    images = _images()
    # Gemma3Processor passes its own pan-and-scan defaults (off) over its image processor's: the call names
    # what the saved image processor holds
    saved = processor.image_processor
    pan = {k: getattr(saved, k) for k in ("do_pan_and_scan", *(f"pan_and_scan_{k}" for k in PAN))}
    assert pan == (
        {"do_pan_and_scan": True, **{f"pan_and_scan_{k}": v for k, v in PAN.items()}}
        if layout == "pan_and_scan"
        else {"do_pan_and_scan": False, **{f"pan_and_scan_{k}": None for k in PAN}}
    )
    pan = {k: v for k, v in pan.items() if v is not None}  # the call refuses None options
    batch = processor(
        images=[[i] for i in images], text=[TEXT] * len(images), return_tensors="pt", padding=True, **pan
    )

    pixels, sizes = vlm.image_inputs(images)
    assert [vlm.layout.num_crops(s) - 1 for s in SIZES] == CROPS[layout]
    assert torch.equal(batch["pixel_values"], pixels)  # every image, then its crops
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    assert torch.equal(types, (ids == vlm.image_token_id).long())
    if layout == "pan_and_scan":  # our prompts hold the processor's ids
        ours = R.our_prompt_batch(
            vlm,
            [f"Here {S.GEMMA3_IMAGE} is the image"] * len(images),
            sizes,
            pad_token_id=vlm.tokenizer.pad_token_id,
        )
        assert torch.equal(ids, ours.input_ids) and torch.equal(mask, ours.attention_mask)

    inputs = {k: v for k, v in batch.items() if k != "num_crops"}
    mine = R.assert_same_logits_and_greedy_tokens(hf, vlm, inputs, pixels, sizes)
    with torch.no_grad():
        causal = hf(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits
    assert (mine - causal)[mask.bool()].abs().max() > 1e-2  # the image blocks attend both ways

    back = VisionLanguageModel.from_pretrained(out)
    assert back.image_layout == vlm.image_layout and back.attention == "image_bidirectional"
    assert back.connector.name == "avg_pool" and back.connector.options == vlm.connector.options
    assert back.tower.feature_layer == -1 and back.processor == vlm.processor
    with torch.no_grad():
        again = back(ids, pixels, mask, image_sizes=sizes).logits
    assert_close(again, mine, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"connector": "mlp2x_gelu"}, ["'mlp'", "avg_pool", "format='native'"]),
        ({"attention": "causal"}, ["causal attention", "image_bidirectional", "format='native'"]),
        ({"feature_layer": -2}, ["feature_layer=-2", "format='native'"]),
        ({"eps": 1e-5}, ["eps=1e-05", "layer_norm_eps", "format='native'"]),
        ({"family": "qwen2"}, ["'qwen2'", "gemma3_text", "format='native'"]),
        ({"layout": "anyres"}, ["'anyres'", "format='llava_next'", "format='native'"]),
    ],
)
def test_gemma3_refuses_what_it_cannot_express_naming_native(change, words, decoders, tmp_path):
    layout = change.pop("layout", "pan_and_scan")
    vlm = _vlm(decoders, layout, **change)
    with pytest.raises(FormatError) as err:
        vlm.save_pretrained(tmp_path / "x", format="gemma3")
    message = str(err.value)
    assert all(w in message for w in words), message
    assert not (tmp_path / "x").exists()


def test_gemma3_checkpoint_made_by_transformers_loads(tmp_path):
    """A Gemma3ForConditionalGeneration and its Gemma3Processor (pan and scan on) as transformers 5 saves
    them read as the same model: pan_and_scan with the saved options, equal logits on the processor's
    inputs."""
    import transformers

    tokenizer = S.gemma3_tokenizer()
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (("boi", S.GEMMA3_BOI), ("eoi", S.GEMMA3_EOI))}
    cfg = transformers.Gemma3Config(
        vision_config=R.hf_tower_config(),
        text_config=R.decoder_config("gemma3_text").to_dict(),
        mm_tokens_per_image=4,
        image_token_index=tokenizer.convert_tokens_to_ids(S.GEMMA3_IMAGE),
        boi_token_index=ids["boi"],
        eoi_token_index=ids["eoi"],
    )
    torch.manual_seed(0)
    hf = R.randomize_(transformers.Gemma3ForConditionalGeneration(cfg).eval(), seed=4, scale=0.2)
    hf.save_pretrained(tmp_path / "g3")
    pan = {"do_pan_and_scan": True, **{f"pan_and_scan_{k}": v for k, v in PAN.items()}}
    image_processor = transformers.Gemma3ImageProcessor(
        size={"height": TILE, "width": TILE}, image_mean=[0.5] * 3, image_std=[0.5] * 3, **pan
    )
    processor = transformers.Gemma3Processor(image_processor, tokenizer, image_seq_length=4)
    processor.save_pretrained(tmp_path / "g3")
    vlm = VisionLanguageModel.from_pretrained(tmp_path / "g3")
    assert vlm.image_layout.name == "pan_and_scan" and vlm.image_layout.options == PAN, vlm.image_layout
    assert vlm.attention == "image_bidirectional" and vlm.processor.resample == "bilinear"
    images = _images()[:4]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=[[i] for i in images], text=[TEXT] * 4, return_tensors="pt", padding=True, **pan)
    pixels, sizes = vlm.image_inputs(images)
    assert torch.equal(batch["pixel_values"], pixels)
    mask = batch["attention_mask"]
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "num_crops"}
        theirs = hf(**inputs, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        mine = vlm(batch["input_ids"], pixels, mask, image_sizes=sizes).logits
    assert_close(mine[mask.bool()], theirs[mask.bool()], **LOGITS)
