"""timm SigLIP towers in and out: parity with timm's VisionTransformer on tiny random weights."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from tests.helpers.hf_reference import hf_siglip, randomize_
from vision_tower import VisionTower
from vision_tower.cli import main
from vision_tower.formats import timm as timm_format

timm = pytest.importorskip("timm")
TOL = dict(atol=1e-5, rtol=1e-5)

# (timm architecture, size overrides, GELU timm builds it with, attention-pooling head)
CASES = {
    "b16_map_exact_gelu": (
        "vit_base_patch16_siglip_224",
        dict(depth=2, embed_dim=48, img_size=32),
        "gelu",
        True,
    ),
    "so400m_p14_map": (
        "vit_so400m_patch14_siglip_224",
        dict(depth=2, embed_dim=32, img_size=42),
        "gelu",
        True,
    ),
    "so400m_p16_gap_tanh": (
        "vit_so400m_patch16_siglip_gap_256",
        dict(depth=3, embed_dim=32, img_size=48),
        "gelu_pytorch_tanh",
        False,
    ),
}


def tiny_timm(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_(timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).eval(), seed)


def _pixels(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(size))


@pytest.mark.parametrize("case", list(CASES))
def test_timm_checkpoint_loads_with_equal_outputs(case, tmp_path):
    arch, kwargs, act, head = CASES[case]
    ref = tiny_timm(arch, **kwargs)
    timm.models.save_for_hf(ref, tmp_path, safe_serialization=True)  # timm's own hub layout
    assert json.loads((tmp_path / "config.json").read_text())["architecture"] == arch
    ours = VisionTower.from_pretrained(tmp_path).eval()
    assert ours.config.hidden_act == act and (ours.head is not None) == head
    x = _pixels(kwargs["img_size"])
    with torch.no_grad():
        tokens = ref.forward_features(x)  # (B, N, D) after the final norm
        o = ours(x)
    assert_close(o.patch_features, tokens, **TOL)
    if head:
        with torch.no_grad():
            assert_close(o.pooled, ref(x), **TOL)
    else:
        assert o.pooled is None


def test_registered_architectures_match_timm():
    """Heads, GELU, widths and pooling of every architecture name we know, against timm's own registry."""
    for name, arch in timm_format.TIMM_ARCHS.items():
        if name not in timm.list_models():
            continue  # registered by another test
        with torch.device("meta"):
            m = timm.create_model(name, pretrained=False, num_classes=0, weight_init="skip")
        block = m.blocks[0]
        act = {"GELU": "gelu", "GELUTanh": "gelu_pytorch_tanh"}[type(block.mlp.act).__name__]
        if act == "gelu":
            assert block.mlp.act.approximate == "none", name
        found = timm_format.TimmArch(
            m.patch_embed.patch_size[0],
            m.embed_dim,
            len(m.blocks),
            block.attn.num_heads,
            block.mlp.fc1.out_features,
            m.patch_embed.img_size[0],
            act,
            m.attn_pool is not None,
        )
        assert found == arch, name


def _timm_loads(out, x, expected_tokens, expected_pooled):
    """timm reads our output both ways (local-dir and pretrained_cfg_overlay) with equal outputs."""
    cfg = json.loads((out / "config.json").read_text())
    by_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    by_file = timm.create_model(
        cfg["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
        **cfg["model_args"],
    ).eval()
    for model in (by_dir, by_file):
        with torch.no_grad():
            assert_close(model.forward_features(x), expected_tokens, **TOL)
            if expected_pooled is not None:
                assert_close(model(x), expected_pooled, **TOL)


@pytest.mark.parametrize("case", ["so400m_p14_map", "so400m_p16_gap_tanh"])
def test_round_trip_through_the_timm_layout(case, tmp_path):
    arch, kwargs, _, head = CASES[case]
    timm.models.save_for_hf(tiny_timm(arch, seed=3, **kwargs), tmp_path / "src", safe_serialization=True)
    ours = VisionTower.from_pretrained(tmp_path / "src").eval()
    ours.save_pretrained(tmp_path / "out", format="timm")
    x = _pixels(kwargs["img_size"])
    with torch.no_grad():
        o = ours(x)
    _timm_loads(tmp_path / "out", x, o.patch_features, o.pooled if head else None)
    again = VisionTower.from_pretrained(tmp_path / "out")
    assert again.config == ours.config
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_transformers_checkpoint_converts_to_timm_by_the_command(tmp_path):
    """The image tower of a transformers SiglipModel (tanh GELU, 4 heads, patch 8), written for timm by
    `convert --to timm` (timm holds image towers only)."""
    ref = hf_siglip(seed=5)
    ref.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "timm"), "--to", "timm"]) == 0
    cfg = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert cfg["model_args"]["act_layer"] == "gelu_tanh" and cfg["model_args"]["num_heads"] == 4
    x = _pixels(32)
    with torch.no_grad():
        r = ref.vision_model(x)
    _timm_loads(tmp_path / "timm", x, r.last_hidden_state, r.pooler_output)


def test_timm_layout_errors(tmp_path):
    from vision_tower import CheckpointError

    ref = tiny_timm("vit_base_patch16_siglip_224", depth=1, embed_dim=24, img_size=32)
    timm.models.save_for_hf(ref, tmp_path, safe_serialization=True)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json.*'architecture'"):
        VisionTower.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_mystery_patch16_224"}))
    with pytest.raises(CheckpointError, match="vit_mystery_patch16_224.*register_timm_arch"):
        VisionTower.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="open_clip checkpoints hold both towers"):
        VisionTower.from_preset("tiny").save_pretrained(tmp_path / "x", format="open_clip")
