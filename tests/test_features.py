"""The patch-feature extractor: resized position tables, layer choice, head on/off."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tests.helpers.hf_reference import hf_vision
from vision_tower import VisionTower, interpolate_pos_embed

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def ref_and_dir(tmp_path_factory):
    ref = hf_vision(seed=11, num_hidden_layers=3)
    folder = tmp_path_factory.mktemp("ref")
    ref.save_pretrained(folder)
    return ref, folder


@pytest.mark.parametrize("size", [48, 56, 40])
def test_resized_tower_matches_transformers_interpolation(ref_and_dir, size, tmp_path):
    from transformers import SiglipVisionModel

    ref, folder = ref_and_dir
    ours = VisionTower.from_pretrained(folder, image_size=size).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        r = ref(x, interpolate_pos_encoding=True)
        o = ours(x)
    g = size // 8
    assert o.grid == (g, g) and o.patch_features.shape == (2, g * g, 48)
    assert_close(o.patch_features, r.last_hidden_state, **TOL)
    assert_close(o.pooled, r.pooler_output, **TOL)
    # the resized table is what gets saved: transformers runs it at `size` without interpolating
    ours.save_pretrained(tmp_path / "resized")
    back = SiglipVisionModel.from_pretrained(tmp_path / "resized").eval()
    assert back.config.image_size == size
    with torch.no_grad():
        assert_close(back(x).last_hidden_state, r.last_hidden_state, **TOL)


def test_runtime_interpolation_and_clear_error(ref_and_dir):
    ref, folder = ref_and_dir
    ours = VisionTower.from_pretrained(folder).eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="image_size=64"):
        ours(x)
    with torch.no_grad():
        assert_close(
            ours(x, interpolate_pos_encoding=True).patch_features,
            ref(x, interpolate_pos_encoding=True).last_hidden_state,
            **TOL,
        )


@pytest.mark.parametrize("layer", [-1, -2, -3, -4, 0, 1, 2, 3])
def test_feature_layer_matches_hidden_states(ref_and_dir, layer):
    ref, folder = ref_and_dir
    ours = VisionTower.from_pretrained(folder, feature_layer=layer, use_head=False).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        r = ref(x, output_hidden_states=True)
        o = ours(x)
    expected = r.last_hidden_state if layer == -1 else r.hidden_states[layer]
    assert_close(o.patch_features, expected, **TOL)
    assert o.pooled is None


def test_blocks_above_the_feature_layer_are_not_computed(ref_and_dir):
    _, folder = ref_and_dir
    tower = VisionTower.from_pretrained(folder, feature_layer=-2, use_head=False).eval()
    calls = []
    for i, block in enumerate(tower.encoder.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    tower(torch.randn(1, 3, 32, 32))
    assert calls == [0, 1]  # 3 blocks, layer -2 is the output of block 2 (index 1)
    calls.clear()
    tower.feature_layer = -1
    tower(torch.randn(1, 3, 32, 32))
    assert calls == [0, 1, 2]


def test_head_on_with_lower_feature_layer_still_pools_the_final_output(ref_and_dir):
    ref, folder = ref_and_dir
    ours = VisionTower.from_pretrained(folder, feature_layer=-2).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        r = ref(x, output_hidden_states=True)
        o = ours(x)
    assert_close(o.patch_features, r.hidden_states[-2], **TOL)
    assert_close(o.pooled, r.pooler_output, **TOL)


def test_use_head_false_drops_the_head_and_saves_without_it(ref_and_dir, tmp_path):
    from transformers import SiglipVisionModel

    _, folder = ref_and_dir
    tower = VisionTower.from_pretrained(folder, use_head=False)
    assert tower.head is None and not any(k.startswith("head.") for k in tower.state_dict())
    tower.save_pretrained(tmp_path / "nohead")
    back = SiglipVisionModel.from_pretrained(tmp_path / "nohead")
    assert not back.config.vision_use_head


def test_feature_layer_out_of_range_is_refused(ref_and_dir):
    _, folder = ref_and_dir
    with pytest.raises(ValueError, match="out of range"):
        VisionTower.from_pretrained(folder, feature_layer=4)
    with pytest.raises(ValueError, match="out of range"):
        VisionTower.from_pretrained(folder, feature_layer=-5)


@pytest.mark.parametrize("size,tokens", [(384, 729), (448, 1024)])
def test_token_grid_of_patch14_towers(size, tokens):
    """So400m/14's grid (built at reduced width so the test stays fast): 27x27 at 384, 32x32 at 448."""
    tower = VisionTower.from_preset(
        "so400m_p14_384",
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        use_head=False,
    ).eval()
    if size != 384:
        tower.resize_pos_embed(size)
    with torch.no_grad():
        out = tower(torch.randn(1, 3, size, size))
    assert out.patch_features.shape == (1, tokens, 32)
    assert out.grid == (int(tokens**0.5),) * 2


def test_interpolate_pos_embed_is_identity_at_native_size():
    table = torch.randn(16, 8)
    assert interpolate_pos_embed(table, (4, 4)) is table
    assert interpolate_pos_embed(table, (6, 3)).shape == (18, 8)
