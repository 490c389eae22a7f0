"""VisionLanguageModel with the ``split`` (Idefics3 / SmolVLM) and ``pan_and_scan`` (Gemma 3) image layouts:
the prompt holds each image's ids as transformers' ``Idefics3Processor`` / ``Gemma3Processor`` write them
(placeholders and the layout's text), the crops' tokens land in the placeholders in order, and generation
writes the same prompt; a tokenizer without the layout's special tokens is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from connectors import VisionLanguageModel
from tests.helpers import split_pan_reference as S
from tests.helpers import vlm_reference as R
from tests.helpers.vlm_data import png
from vision_tower import ImageProcessor

TILE = 32  # R.tower(): 32 px crops, 4x4 patch tokens; both connectors make 2x2 = 4 tokens per crop
SIZES = [(50, 150), (64, 40), (30, 30)]
PAN = {"min_crop_size": 16, "max_num_crops": 4, "min_ratio_to_activate": 1.2}
CASES = {
    "split": dict(
        connector=("pixel_shuffle", {"factor": 2}),
        resample="lanczos",
        options={},
        tokenizer=S.idefics3_tokenizer,
        image_token=S.IDEFICS3_IMAGE,
        reference=lambda: S.idefics3_processor("torchvision", TILE, 4, longest_edge=4 * TILE),
        marker=S.IDEFICS3_IMAGE,
        call={},
    ),
    "pan_and_scan": dict(
        connector=("avg_pool", {"tokens_per_side": 2}),
        resample="bilinear",
        options=PAN,
        tokenizer=S.gemma3_tokenizer,
        image_token=S.GEMMA3_IMAGE,
        reference=lambda: S.gemma3_processor("torchvision", TILE, 4),
        marker=S.GEMMA3_BOI,
        call={"do_pan_and_scan": True, **{f"pan_and_scan_{k}": v for k, v in PAN.items()}},
    ),
}


def _images(sizes=SIZES) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _vlm(layout: str, tokenizer=None) -> VisionLanguageModel:
    case = CASES[layout]
    tokenizer = tokenizer or case["tokenizer"]()
    name, options = case["connector"]
    torch.manual_seed(0)
    return VisionLanguageModel(
        R.tower(),
        name,
        R.decoder("qwen2"),
        connector_options=options,
        tokenizer=tokenizer,
        image_token_id=tokenizer.convert_tokens_to_ids(case["image_token"]),
        processor=ImageProcessor(image_size=TILE, resample=case["resample"]),
        attention="causal",
        image_layout=layout,
        layout_options=case["options"],
    ).eval()


@pytest.mark.parametrize("layout", ["split", "pan_and_scan"])
def test_prompt_and_generation_equal_the_transformers_processor(layout):
    case = CASES[layout]
    vlm, reference = _vlm(layout), case["reference"]()
    images = _images()
    pixels, sizes = vlm.image_inputs(images)
    word = "hi" if layout == "split" else "Here"  # a word of each test tokenizer's vocabulary
    batch = R.our_prompt_batch(vlm, [f"{word} {case['image_token']} {word}"] * len(SIZES), sizes)
    expected_pixels = []
    for i, image in enumerate(images):  # each row: the processor's ids for the same text and image
        out = reference(
            images=image, text=f"{word} {case['marker']} {word}", return_tensors="pt", **case["call"]
        )
        row = batch.input_ids[i][batch.attention_mask[i].bool()]
        assert row.tolist() == out["input_ids"][0].tolist(), SIZES[i]
        assert int((row == vlm.image_token_id).sum()) == vlm.tokens_for(SIZES[i])
        expected_pixels.append(out["pixel_values"].reshape(-1, 3, TILE, TILE))
    assert torch.equal(pixels, torch.cat(expected_pixels))
    # split: 2x4, 4x3 and 4x4 tiles (a small image is enlarged) and the global crop; pan and scan: the
    # whole image and 3, 2 or no crops
    assert [vlm.layout.num_crops(s) for s in SIZES] == ([9, 13, 17] if layout == "split" else [4, 3, 1])
    # the crops' tokens, in crop order, in the placeholders (as transformers' models scatter them)
    with torch.no_grad():
        out = vlm(batch.input_ids, pixels, batch.attention_mask, image_sizes=sizes)
        crops = vlm.connector(vlm.tower(pixels).patch_features, (4, 4))  # (crops, 4, E)
    logits = R.decoder_logits_with_images(vlm, batch, crops.reshape(-1, crops.shape[-1]))
    mask = batch.attention_mask.bool()
    assert_close(out.logits[mask], logits[mask], rtol=1e-5, atol=1e-5)
    # generate from the prompt strings writes the same ids: greedy by full forwards on them, no KV cache
    prompts = [f"{word} {case['image_token']} {word}"] * len(SIZES)
    new = vlm.generate(pixels, prompts, image_sizes=sizes, max_new_tokens=4, eos_token_id=[])
    ids, mask = batch.input_ids, batch.attention_mask
    for step in range(4):
        with torch.no_grad():
            step_logits = vlm(ids, pixels, mask, image_sizes=sizes).logits[:, -1]
        step_logits[:, vlm.image_token_id] = float("-inf")
        token = step_logits.argmax(-1)
        assert torch.equal(new[:, step], token), step
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


@pytest.mark.parametrize("layout", ["split", "pan_and_scan"])
def test_a_tokenizer_without_the_layout_tokens_is_refused(layout):
    missing = "<fake_token_around_image>, <global-img>" if layout == "split" else "<start_of_image>"
    with pytest.raises(ValueError, match=f"image layout {layout!r} writes {missing}.*does not hold"):
        _vlm(layout, tokenizer=R.tokenizer())


@pytest.mark.parametrize("layout", ["split", "pan_and_scan"])
def test_training_rows_hold_the_processors_ids_and_crops(layout):
    """A caption sample's row (a causal model: the image, then the prompt) starts with the processor's ids
    for the image before the prompt, and the batch holds its crops."""
    from training.data.vlm import builder_for
    from vision_tower import load_image

    case = CASES[layout]
    vlm, reference = _vlm(layout), case["reference"]()
    word = "hi" if layout == "split" else "Here"
    builder = builder_for(vlm, max_length=200, caption_prompt=word)
    rng = np.random.default_rng(1)
    blob = png(Image.fromarray(rng.integers(0, 256, (40, 90, 3), dtype=np.uint8)))
    item = builder.build({"__key__": "k", "__url__": "mem.tar", "png": blob, "txt": word.encode()})
    out = reference(
        images=load_image(blob), text=f"{case['marker']}{word}", return_tensors="pt", **case["call"]
    )
    assert item.input_ids[: item.num_prefix] == out["input_ids"][0].tolist()
    assert torch.equal(item.images, out["pixel_values"].reshape(-1, 3, TILE, TILE))
    assert item.images.shape[0] > 1 and not item.truncated
    # a conversation (LLaVA's v1 template): the same image ids where the human turn holds the image
    span = reference(images=load_image(blob), text=case["marker"], **case["call"])["input_ids"][0][
        1:
    ]  # no bos
    turns = [{"from": "human", "value": f"{case['image_token']}\n{word}"}, {"from": "gpt", "value": word}]
    meta = json.dumps({"id": "c", "image": "x.png", "conversations": turns}).encode()
    chat = builder_for(vlm, max_length=200, chat_template="v1")
    ids = chat.build({"__key__": "c", "__url__": "mem.tar", "png": blob, "json": meta}).input_ids
    starts = [i for i in range(len(ids)) if ids[i : i + len(span)] == span]
    assert len(starts) == 1 and ids.count(vlm.image_token_id) == vlm.tokens_for((40, 90))
