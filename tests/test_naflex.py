"""SigLIP 2 NaFlex: tower and processor against transformers' Siglip2VisionModel / Siglip2ImageProcessor
on tiny random weights and real photographs; checkpoints; per-image grids in feature extraction."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch.testing import assert_close

from tests.helpers.hf_reference import hf_naflex, naflex_config, randomize_
from tests.helpers.photos import make_photo, shipped_photo
from vision_tower import (
    CheckpointError,
    NaFlexImageProcessor,
    NaFlexVisionTower,
    SiglipModel,
    VisionTower,
)
from vision_tower.cli import main

transformers = pytest.importorskip("transformers")
TOL = dict(atol=1e-5, rtol=1e-5)
SIZES = [(333, 517), (1000, 75), (20, 30), (64, 64)]


def photos() -> list[Image.Image]:
    path = shipped_photo()
    real = [Image.open(path).convert("RGB")] if path else []
    return real + [make_photo(h, w, seed=h + w) for h, w in SIZES]


def reference_processor(backend: str, **kw):
    if backend == "pil":
        return transformers.Siglip2ImageProcessorPil(**kw)
    pytest.importorskip("torchvision")
    return transformers.Siglip2ImageProcessor(**kw)


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("max_num_patches", [64, 256])
def test_processor_equals_siglip2_image_processor(backend, max_num_patches):
    images = photos()
    ref = reference_processor(backend, patch_size=16, max_num_patches=max_num_patches)(
        images, return_tensors="pt"
    )
    ours = NaFlexImageProcessor(max_num_patches=max_num_patches, backend=backend)(images)
    assert torch.equal(ours.spatial_shapes, ref["spatial_shapes"])
    assert torch.equal(ours.attention_mask, ref["pixel_attention_mask"].to(ours.attention_mask.dtype))
    assert torch.equal(ours.pixel_values, ref["pixel_values"])  # bit for bit
    h, w = ours.spatial_shapes[1].tolist()  # 333x517: aspect kept within a patch
    assert h * w <= max_num_patches and abs(w / h - 517 / 333) < 0.25


def test_tower_equals_siglip2_vision_model_on_photographs(tmp_path):
    ref = hf_naflex(seed=1)
    ref.save_pretrained(tmp_path)
    inputs = NaFlexImageProcessor(patch_size=8, max_num_patches=48)(photos())
    ours = NaFlexVisionTower.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        r = ref(
            pixel_values=inputs.pixel_values,
            pixel_attention_mask=inputs.attention_mask,
            spatial_shapes=inputs.spatial_shapes,
            output_hidden_states=True,
        )
        o = ours(inputs.pixel_values, inputs.spatial_shapes, inputs.attention_mask, output_hidden_states=True)
    assert_close(o.patch_features, r.last_hidden_state, **TOL)  # padding rows included
    assert_close(o.pooled, r.pooler_output, **TOL)
    for a, b in zip(o.hidden_states, r.hidden_states, strict=True):
        assert_close(a, b, **TOL)
    assert o.grids == [tuple(s) for s in inputs.spatial_shapes.tolist()]
    assert [t.shape[0] for t in o.per_image()] == [h * w for h, w in o.grids]
    lower = NaFlexVisionTower.from_pretrained(tmp_path, feature_layer=-2, use_head=False).eval()
    with torch.no_grad():
        low = lower(inputs.pixel_values, inputs.spatial_shapes, inputs.attention_mask)
    assert_close(low.patch_features, r.hidden_states[-2], **TOL)
    assert low.pooled is None


def test_gradients_equal_siglip2(tmp_path):
    ref = hf_naflex(seed=2)
    ref.save_pretrained(tmp_path)
    ours = NaFlexVisionTower.from_pretrained(tmp_path)
    inputs = NaFlexImageProcessor(patch_size=8, max_num_patches=40)(
        [make_photo(90, 50, seed=1), make_photo(40, 120)]
    )
    r = ref(
        pixel_values=inputs.pixel_values,
        pixel_attention_mask=inputs.attention_mask,
        spatial_shapes=inputs.spatial_shapes,
    )
    o = ours(inputs.pixel_values, inputs.spatial_shapes, inputs.attention_mask)
    (r.pooler_output.square().sum() + r.last_hidden_state[:, :5].sum()).backward()
    (o.pooled.square().sum() + o.patch_features[:, :5].sum()).backward()
    pairs = {
        "patch_embed.weight": ref.embeddings.patch_embedding.weight,
        "pos_embed": ref.embeddings.position_embedding.weight,
        "head.probe": ref.head.probe,
        "encoder.blocks.0.mlp.fc1.weight": ref.encoder.layers[0].mlp.fc1.weight,
    }
    params = dict(ours.named_parameters())
    for name, theirs in pairs.items():
        assert_close(params[name].grad, theirs.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_checkpoints_in_and_out(tmp_path):
    ref = hf_naflex(seed=3, vision_use_head=False)
    ref.save_pretrained(tmp_path / "ref")
    ours = NaFlexVisionTower.from_pretrained(tmp_path / "ref")
    assert ours.head is None
    ours.save_pretrained(tmp_path / "ours")
    back, info = transformers.Siglip2VisionModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info.values()), info
    inputs = NaFlexImageProcessor(patch_size=8, max_num_patches=30)([make_photo(50, 70)])
    with torch.no_grad():
        expected = ref(
            pixel_values=inputs.pixel_values,
            pixel_attention_mask=inputs.attention_mask,
            spatial_shapes=inputs.spatial_shapes,
        ).last_hidden_state
        assert_close(
            back.eval()(
                pixel_values=inputs.pixel_values,
                pixel_attention_mask=inputs.attention_mask,
                spatial_shapes=inputs.spatial_shapes,
            ).last_hidden_state,
            expected,
            **TOL,
        )
    with pytest.raises(CheckpointError, match="NaFlex.*NaFlexVisionTower"):
        VisionTower.from_pretrained(tmp_path / "ref")
    with pytest.raises(ValueError, match="only"):
        ours.save_pretrained(tmp_path / "t", format="timm")


def test_two_tower_siglip2_checkpoint(tmp_path):
    text = dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50
    )
    cfg = transformers.Siglip2Config(vision_config=naflex_config().to_dict(), text_config=text)
    torch.manual_seed(0)
    ref = randomize_(transformers.Siglip2Model(cfg).eval())
    ref.save_pretrained(tmp_path)
    tower = NaFlexVisionTower.from_pretrained(tmp_path).eval()  # the text tower is not read
    inputs = NaFlexImageProcessor(patch_size=8, max_num_patches=24)([make_photo(30, 90)])
    with torch.no_grad():
        r = ref.vision_model(
            pixel_values=inputs.pixel_values,
            pixel_attention_mask=inputs.attention_mask,
            spatial_shapes=inputs.spatial_shapes,
        )
        assert_close(
            tower(inputs.pixel_values, inputs.spatial_shapes, inputs.attention_mask).pooled,
            r.pooler_output,
            **TOL,
        )
    with pytest.raises(CheckpointError, match="NaFlexVisionTower"):
        SiglipModel.from_pretrained(tmp_path)


def test_processor_config_files(tmp_path):
    transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=100).save_pretrained(tmp_path / "t")
    ours = NaFlexImageProcessor.from_pretrained(tmp_path / "t")
    assert (ours.patch_size, ours.max_num_patches, ours.resample) == (8, 100, "bilinear")
    ours.save_pretrained(tmp_path / "o")
    back = transformers.AutoImageProcessor.from_pretrained(tmp_path / "o")
    assert type(back).__name__.startswith("Siglip2ImageProcessor")
    assert (back.patch_size, back.max_num_patches, back.resample) == (8, 100, 2)
    with pytest.raises(ValueError, match="NaFlexImageProcessor"):
        from vision_tower import ImageProcessor

        ImageProcessor.from_pretrained(tmp_path / "o")


def test_extract_gives_per_image_grids(tmp_path, capsys):
    ref = hf_naflex(seed=4)
    ref.save_pretrained(tmp_path / "m")
    NaFlexImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(tmp_path / "m")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (h, w) in enumerate([(40, 120), (100, 50), (64, 64)]):
        make_photo(h, w, seed=i, quality=None).save(folder / f"{i}.png")
    out = tmp_path / "f.safetensors"
    args = ["extract", "--model", str(tmp_path / "m"), "--images", str(folder), "--out", str(out)]
    assert main([*args, "--max-num-patches", "24", "--batch-size", "2", "--quiet", "--dtype", "float32"]) == 0
    assert "grid per image" in capsys.readouterr().out
    with safe_open(out, "pt") as f:
        meta, feats = f.metadata(), f.get_tensor("patch_features")
        mask, shapes = f.get_tensor("attention_mask"), f.get_tensor("spatial_shapes")
    files = json.loads(meta["files"])
    grids = [tuple(g) for g in json.loads(meta["grids"])]
    assert len(set(grids)) == 3 and feats.shape == (3, 24, 48) and "grid" not in meta
    assert shapes.tolist() == [list(g) for g in grids] and mask.sum(1).tolist() == [h * w for h, w in grids]
    for i, file in enumerate(files):  # one image at a time through transformers gives the same real tokens
        inputs = NaFlexImageProcessor(patch_size=8, max_num_patches=24)(file)
        with torch.no_grad():
            r = ref(
                pixel_values=inputs.pixel_values,
                pixel_attention_mask=inputs.attention_mask,
                spatial_shapes=inputs.spatial_shapes,
            )
        h, w = grids[i]
        assert_close(feats[i, : h * w], r.last_hidden_state[0, : h * w], **TOL)
    assert main([*args, "--image-size", "64", "--overwrite"]) == 2
    assert "NaFlex tower" in capsys.readouterr().err


def test_mask_follows_the_inputs_device():
    """The processor's mask stays on the CPU while the pixels move to the tower's device (as
    ``extract_features`` does): the tower puts it beside them. ``meta`` stands in for an accelerator."""
    from vision_tower import NaFlexVisionConfig

    cfg = NaFlexVisionConfig.from_hf(naflex_config(num_hidden_layers=2).to_dict())
    tower = NaFlexVisionTower(cfg).to("meta")
    pixels = torch.randn(2, 16, cfg.patch_dim, device="meta")
    mask = torch.zeros(2, 16, dtype=torch.long)
    mask[0], mask[1, :6] = 1, 1
    out = tower(pixels, torch.tensor([[4, 4], [2, 3]]), mask)
    assert (
        out.patch_features.device.type == out.pooled.device.type == out.attention_mask.device.type == "meta"
    )
