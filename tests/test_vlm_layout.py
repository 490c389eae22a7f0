"""VisionLanguageModel with a tiled image layout (anyres, anyres_max): the crops of every image through the
tower in one call, packed as transformers' LLaVA-NeXT / OneVision pack them, in the prompt's placeholders;
generation, the trained image_newline, the native checkpoint and a tower swap."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from connectors import VisionLanguageModel
from tests.helpers import anyres_reference as A
from tests.helpers import vlm_reference as R
from vision_tower import ImageProcessor, VisionConfig, VisionTower

TILE, PATCH = 32, 8  # R.tower(): 32 px crops, 4x4 tokens
PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
SIZES = [(20, 70), (64, 40), (90, 90), (12, 12), (150, 60)]  # wide, tall, square, under a tile, over all


def _images(sizes=SIZES) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _vlm(layout: str = "anyres", decoder=None, **options) -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel(
        R.tower(),
        "mlp2x_gelu",
        decoder if decoder is not None else R.decoder("qwen2"),
        tokenizer=R.tokenizer(),
        processor=ImageProcessor(image_size=TILE),
        attention="causal",
        image_layout=layout,
        layout_options={} if layout == "fixed" else {"grid_pinpoints": PINPOINTS, **options},
    ).eval()


def _prompts(vlm, sizes, text="caption en"):
    return R.our_prompt_batch(vlm, [text] * len(sizes), sizes)


@pytest.mark.parametrize("layout", ["anyres", "anyres_max_1"])
def test_the_prompt_holds_transformers_packed_tokens_of_every_crop_in_image_order(layout):
    """The decoder sees, in each image's placeholders, the connector outputs of its crops as transformers'
    ``pack_image_features`` packs them (base image, unpadded tile grid with a newline per row; shrunk to
    one tile's worth by anyres_max_1), and nothing else changes: logits equal the decoder run on
    embeddings put together by hand from transformers' packing."""
    name, max_tiles = ("anyres_max", 1) if layout == "anyres_max_1" else ("anyres", None)
    vlm = _vlm(name, **({"max_tiles": max_tiles} if max_tiles else {}))
    pixels, sizes = vlm.image_inputs(_images())
    assert sizes.tolist() == [list(s) for s in SIZES]
    batch = _prompts(vlm, SIZES)
    with torch.no_grad():
        out = vlm(batch.input_ids, pixels, batch.attention_mask, image_sizes=sizes)
        crops = vlm.connector(vlm.tower(pixels).patch_features, (4, 4))  # (crops, 16, E)
    per_image = list(torch.split(crops, [vlm.layout.num_crops(s) for s in SIZES]))
    newline = vlm.layout_params["image_newline"].detach()
    if max_tiles:
        ref, lengths = A.pack_llava_onevision(
            per_image, SIZES, newline, tile=TILE, patch=PATCH, pinpoints=PINPOINTS, max_tiles=max_tiles
        )
    else:
        ref, lengths = A.pack_llava_next(
            per_image, SIZES, newline, tile=TILE, patch=PATCH, pinpoints=PINPOINTS
        )
    assert lengths.tolist() == [vlm.tokens_for(s) for s in SIZES]
    assert_close(out.image_tokens, ref, rtol=0, atol=1e-6)
    # the decoder on embeddings where the placeholders hold transformers' tokens, in order
    logits = R.decoder_logits_with_images(vlm, batch, ref)
    mask = batch.attention_mask.bool()
    assert_close(out.logits[mask], logits[mask], rtol=1e-5, atol=1e-5)


def test_generation_follows_the_layout_and_equals_full_forwards_without_cache():
    vlm = _vlm()
    images = _images(SIZES[:3])
    pixels, sizes = vlm.image_inputs(images)
    new = vlm.generate(pixels, ["caption en"] * 3, image_sizes=sizes, max_new_tokens=5, eos_token_id=[])
    batch = _prompts(vlm, SIZES[:3])
    ids, mask = batch.input_ids, batch.attention_mask
    expected = []
    for _ in range(5):  # greedy by full forwards, no KV cache
        with torch.no_grad():
            logits = vlm(ids, pixels, mask, image_sizes=sizes).logits[:, -1]
        logits[:, vlm.image_token_id] = float("-inf")
        token = logits.argmax(-1)
        expected.append(token)
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(new, torch.stack(expected, 1))


def test_align_trains_image_newline_with_the_connector_and_without_weight_decay():
    vlm = _vlm()
    vlm.set_trainable(tower=False, connector=True, decoder=False)
    trained = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert "layout_params.image_newline" in trained
    assert all(n.startswith(("connector.", "layout_params.")) for n in trained)
    assert "layout_params.image_newline" in vlm.no_weight_decay()
    pixels, sizes = vlm.image_inputs(_images(SIZES[:2]))
    batch = _prompts(vlm, SIZES[:2], "a b c")
    types = (batch.input_ids == vlm.image_token_id).long() ^ 1
    out = vlm(
        batch.input_ids,
        pixels,
        batch.attention_mask,
        types,
        batch.input_ids,
        image_sizes=sizes,
        targets_only=True,
    )
    out.loss.backward()
    assert vlm.layout_params["image_newline"].grad.abs().sum() > 0
    vlm.set_trainable(tower=False, connector=False, decoder=True)
    assert not vlm.layout_params["image_newline"].requires_grad


def test_native_checkpoint_keeps_the_layout_and_its_newline(tmp_path):
    vlm = _vlm("anyres_max_9")
    vlm.save_pretrained(tmp_path / "native")
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["image_layout"] == {
        "name": "anyres_max",
        "options": {"grid_pinpoints": PINPOINTS, "max_tiles": 9},
    }
    back = VisionLanguageModel.from_pretrained(tmp_path / "native")
    assert back.image_layout == vlm.image_layout
    assert torch.equal(back.layout_params["image_newline"], vlm.layout_params["image_newline"])
    pixels, sizes = vlm.image_inputs(_images(SIZES[:2]))
    batch = _prompts(vlm, SIZES[:2])
    with torch.no_grad():
        a = vlm(batch.input_ids, pixels, batch.attention_mask, image_sizes=sizes).logits
        b = back(batch.input_ids, pixels, batch.attention_mask, image_sizes=sizes).logits
    assert torch.equal(a, b)
    # a folder that lost its newline is refused naming the tensor, not filled with a random one
    (tmp_path / "native" / "layout.safetensors").unlink()
    with pytest.raises(Exception, match="image_newline"):
        VisionLanguageModel.from_pretrained(tmp_path / "native")


def test_a_native_folder_written_before_layouts_loads_as_fixed(tmp_path):
    vlm = _vlm("fixed")
    vlm.save_pretrained(tmp_path / "native")
    file = tmp_path / "native" / "config.json"
    config = json.loads(file.read_text())
    assert config.pop("image_layout") == {"name": "fixed", "options": {}}
    file.write_text(json.dumps(config))
    back = VisionLanguageModel.from_pretrained(tmp_path / "native")
    assert back.layout.name == "fixed" and len(back.layout_params) == 0


def test_missing_sizes_and_wrong_counts_are_errors_naming_the_image():
    vlm = _vlm()
    pixels, sizes = vlm.image_inputs(_images(SIZES[:2]))
    batch = _prompts(vlm, SIZES[:2])
    with pytest.raises(ValueError, match="needs image_sizes .* vlm.image_inputs"):
        vlm(batch.input_ids, pixels, batch.attention_mask)
    short = _prompts(vlm, [SIZES[0], SIZES[0]])  # the second image (64x40) takes more tokens
    n0, n1 = vlm.tokens_for(SIZES[0]), vlm.tokens_for(SIZES[1])
    assert n0 != n1
    with pytest.raises(
        ValueError,
        match=rf"image 1 \(64x40, layout 'anyres'\) gives {n1} image tokens, its prompt "
        rf"holds {n0}",
    ):
        vlm(short.input_ids, pixels, short.attention_mask, image_sizes=sizes)


def test_a_tower_swap_rebuilds_the_layout_for_the_new_crops_and_keeps_the_newline():
    torch.manual_seed(1)
    wide = VisionTower(VisionConfig(**{**R.TOWER, "image_size": 64, "patch_size": 16, "use_head": False}))
    vlm = _vlm()  # pinpoints set for 32-px tiles: refused, and the VLM is left as it was
    with pytest.raises(ValueError, match="not a multiple of the 64 px tile"):
        vlm.replace_tower(wide)
    assert vlm.layout.crop.size == (32, 32) and vlm.tower.config.image_size == 32
    torch.manual_seed(0)
    vlm = VisionLanguageModel(R.tower(), "mlp2x_gelu", R.decoder("qwen2"), image_layout="anyres")
    newline = vlm.layout_params["image_newline"].detach().clone()
    vlm.replace_tower(wide)
    assert (vlm.layout.crop.size, vlm.layout.crop.tokens) == ((64, 64), 16)
    assert torch.equal(vlm.layout_params["image_newline"], newline)
    assert vlm.tokens_for((64, 128)) == 16 + 4 * 8 + 4  # base, 1x2 tiles of 4x4 tokens, a newline per row


def test_info_and_generate_commands_follow_the_layout(tmp_path, capsys):
    from vision_tower.cli import main

    vlm = _vlm("anyres_max_9")
    vlm.save_pretrained(tmp_path / "native")
    assert main(["info", str(tmp_path / "native"), "--image-size", "20x70", "--image-size", "150x60"]) == 0
    out = capsys.readouterr().out
    assert "image layout: anyres_max (grid_pinpoints=" in out and "max_tiles=9" in out
    for size in ((20, 70), (150, 60)):
        n, crops = vlm.tokens_for(size), vlm.layout.num_crops(size)
        assert f"{size[0]}x{size[1]} px: {n} tokens, {crops} crops" in out
    assert main(["info", "preset:tiny", "--image-size", "64x64"]) == 2  # a tower: refused in one line
    assert "info --image-size gives the tokens of a VLM checkpoint" in capsys.readouterr().err
    (image,) = _images(SIZES[:1])  # 20x70: the base image and 1x3 tiles
    image.save(tmp_path / "wide.png")
    args = ["generate", "--model", str(tmp_path / "native"), "--max-new-tokens", "4", "--dtype", "float32"]
    assert main([*args, "--image", str(tmp_path / "wide.png"), "--prompt", "caption en"]) == 0
    printed = capsys.readouterr().out
    pixels, sizes = vlm.image_inputs([Image.open(tmp_path / "wide.png")])
    assert pixels.shape[0] == 4
    ids = vlm.generate(pixels, ["caption en"], image_sizes=sizes, max_new_tokens=4)
    assert printed == vlm.tokenizer.decode(ids[0], skip_special_tokens=True) + "\n"
    vlm.tower.feature_layer = -2  # LLaVA-OneVision reads a block output
    vlm.save_pretrained(tmp_path / "onevision", format="llava_onevision")
    assert main(["info", str(tmp_path / "onevision"), "--image-size", "150x60"]) == 0
    out = capsys.readouterr().out
    assert "llava_onevision layout" in out and "image layout: anyres_max (grid_pinpoints=" in out
    assert f"150x60 px: {vlm.tokens_for((150, 60))} tokens, {vlm.layout.num_crops((150, 60))} crops" in out
