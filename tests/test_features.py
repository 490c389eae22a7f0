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


def test_the_next_batch_is_read_while_the_tower_runs(tmp_path):
    """`extract_features` reads and preprocesses batch i+1 while the tower runs on batch i: the tower's first
    forward waits (5 s at most) for the second batch's preprocessing to start; a serial reader would only
    start it after that forward. The features are those of the tower run on each image alone."""
    import threading

    from PIL import Image

    from vision_tower import ImageProcessor
    from vision_tower.features import extract_features

    files = []
    for i in range(5):
        files.append(tmp_path / f"{i}.png")
        Image.new("RGB", (20 + 4 * i, 24), (40 * i, 90, 200 - 30 * i)).save(files[-1])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    files.insert(2, tmp_path / "bad.png")
    calls, second_read = [], threading.Event()

    class CountingProcessor(ImageProcessor):
        def __call__(self, images):
            calls.append(threading.current_thread().name)
            if len(calls) == 2:
                second_read.set()
            return super().__call__(images)

    torch.manual_seed(0)
    tower = VisionTower.from_preset("tiny").eval()
    processor = CountingProcessor(image_size=tower.config.image_size)
    waited_in_vain = []
    forwards = []

    def before_forward(module, args):
        if not forwards:
            waited_in_vain.append(not second_read.wait(timeout=5))
        forwards.append(len(calls))

    tower.register_forward_pre_hook(before_forward)
    feats = extract_features(tower, files, processor=processor, batch_size=2, progress=False)
    assert waited_in_vain == [False], "the second batch was not read while the tower ran on the first"
    assert all(name.startswith("extract-read") for name in calls)
    assert feats.skipped == {str(tmp_path / "bad.png"): feats.skipped[str(tmp_path / "bad.png")]}
    assert feats.files == [str(f) for f in files if f.name != "bad.png"]
    with torch.no_grad():
        alone = torch.cat(
            [
                tower(processor([Image.open(f).convert("RGB")])).patch_features
                for f in files
                if f.name != "bad.png"
            ]
        )
    assert_close(feats.patch_features, alone, **TOL)
