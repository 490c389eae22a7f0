"""Loading towers from every supported layout and source, strictly; saving for transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from tests.helpers import vlm_reference as R
from tests.helpers.hf_reference import hf_siglip, hf_vision
from tests.helpers.hub import hub_cache
from vision_tower import CheckpointError, SiglipModel, VisionConfig, VisionTower, get_preset

TOL = dict(atol=1e-5, rtol=1e-5)
ROOT = Path(__file__).resolve().parents[1]


def _pixels(n=2, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _tiny_paligemma():
    text = R.tiny_encoder(
        48,
        64,
        model_type="gemma",
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=24,
    )
    text["vocab_size"] = 300
    return R.hf_paligemma(text, image_token_index=299, projection_dim=48)


def _paligemma_reference(model, x):
    with torch.no_grad():
        return model.model.vision_tower(x).last_hidden_state


@pytest.mark.parametrize("layout", ["v5_saved", "v4", "v5_in_memory"])
def test_paligemma_vision_tower_in_every_key_layout(layout, tmp_path):
    pg = _tiny_paligemma()
    pg.save_pretrained(tmp_path / "pg")
    weights = tmp_path / "pg" / "model.safetensors"
    sd = load_file(weights)
    prefix = {
        "v5_saved": "vision_tower.",
        "v4": "vision_tower.vision_model.",
        "v5_in_memory": "model.vision_tower.vision_model.",
    }[layout]
    renamed = {
        (prefix + k[len("vision_tower.") :]) if k.startswith("vision_tower.") else k: v for k, v in sd.items()
    }
    save_file(renamed, weights)
    tower = VisionTower.from_pretrained(tmp_path / "pg").eval()
    assert tower.head is None
    x = _pixels()
    with torch.no_grad():
        assert_close(tower(x).patch_features, _paligemma_reference(pg, x), **TOL)


def test_sharded_and_single_file_checkpoints(tmp_path):
    ref = hf_vision(seed=21)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    x = _pixels()
    with torch.no_grad():
        expected = ref(x).last_hidden_state
        for src in (tmp_path / "sharded", tmp_path / "sharded" / "model.safetensors.index.json"):
            assert_close(VisionTower.from_pretrained(src).eval()(x).patch_features, expected, **TOL)
    ref.save_pretrained(tmp_path / "single")
    single = tmp_path / "single" / "model.safetensors"
    with torch.no_grad():
        assert_close(VisionTower.from_pretrained(single).eval()(x).patch_features, expected, **TOL)


def test_vision_tower_from_a_siglip_model_checkpoint(tmp_path):
    ref = hf_siglip(seed=22)
    ref.save_pretrained(tmp_path / "siglip")
    tower = VisionTower.from_pretrained(tmp_path / "siglip").eval()
    x = _pixels()
    with torch.no_grad():
        r = ref.vision_model(x)
        o = tower(x)
    assert_close(o.patch_features, r.last_hidden_state, **TOL)
    assert_close(o.pooled, r.pooler_output, **TOL)


def test_round_trip_both_ways(tmp_path):
    from transformers import SiglipVisionModel

    ref = hf_vision(seed=23)
    ref.save_pretrained(tmp_path / "hf")
    ours = VisionTower.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    keys = set(load_file(tmp_path / "ours" / "model.safetensors"))
    assert all(k.startswith("vision_model.") for k in keys)
    back, info = SiglipVisionModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    again = VisionTower.from_pretrained(tmp_path / "ours")
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    x = _pixels()
    with torch.no_grad():
        assert_close(back.eval()(x).pooler_output, ref(x).pooler_output, **TOL)


def _with_keys(tmp_path, edit) -> Path:
    ref = hf_vision(seed=24)
    ref.save_pretrained(tmp_path / "bad")
    weights = tmp_path / "bad" / "model.safetensors"
    sd = load_file(weights)
    edit(sd)
    save_file(sd, weights)
    return tmp_path / "bad"


def test_missing_key_is_named(tmp_path):
    src = _with_keys(tmp_path, lambda sd: sd.pop("encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys.*encoder\.blocks\.1\.mlp\.fc2\.bias"):
        VisionTower.from_pretrained(src)


def test_unexpected_key_is_named(tmp_path):
    src = _with_keys(tmp_path, lambda sd: sd.update({"encoder.layers.0.mlp.fc3.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*encoder\.layers\.0\.mlp\.fc3\.weight"):
        VisionTower.from_pretrained(src)


def test_misshaped_key_is_named(tmp_path):
    src = _with_keys(tmp_path, lambda sd: sd.update({"post_layernorm.weight": torch.ones(47)}))
    with pytest.raises(CheckpointError, match=r"mis-shaped keys.*norm\.weight: checkpoint \(47,\)"):
        VisionTower.from_pretrained(src)


def test_half_a_qkv_triple_is_reported(tmp_path):
    src = _with_keys(tmp_path, lambda sd: sd.pop("encoder.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"q_proj\.weight"):
        VisionTower.from_pretrained(src)


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="unknown key.*'hiden_size'"):
        VisionConfig.from_dict({"hiden_size": 3})


def test_missing_source_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing local path"):
        VisionTower.from_pretrained(str(tmp_path / "nope"))


def test_hub_repo_id_resolves_offline_from_the_cache(tmp_path):
    ref = hf_siglip(seed=25)
    ref.save_pretrained(tmp_path / "src")
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    hub_cache(cache, "google/siglip-tiny-test", tmp_path / "src", commit)
    x = _pixels()
    with torch.no_grad():
        torch.save(
            {
                "x": x,
                "pooled": ref.vision_model(x).pooler_output,
                "logits": ref(pixel_values=x, input_ids=torch.ones(1, 12, dtype=torch.long)).logits_per_image,
            },
            tmp_path / "expected.pt",
        )
    script = textwrap.dedent(f"""
        import torch
        from vision_tower import SiglipModel, VisionTower
        exp = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        t = VisionTower.from_pretrained("google/siglip-tiny-test").eval()
        t2 = VisionTower.from_pretrained("google/siglip-tiny-test", revision={commit!r}).eval()
        m = SiglipModel.from_pretrained("google/siglip-tiny-test").eval()
        with torch.no_grad():
            torch.testing.assert_close(t(exp["x"]).pooled, exp["pooled"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(t2(exp["x"]).pooled, exp["pooled"], atol=1e-5, rtol=1e-5)
            logits = m(exp["x"], torch.ones(1, 12, dtype=torch.long)).logits_per_image
            torch.testing.assert_close(logits, exp["logits"], atol=1e-5, rtol=1e-5)
        try:
            VisionTower.from_pretrained("google/not-in-cache")
        except FileNotFoundError as err:
            assert "not in the cache" in str(err), err
        else:
            raise AssertionError("an uncached repo resolved offline")
        print("HUB-OK")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "HUB-OK" in proc.stdout, proc.stderr[-3000:]


def test_siglip_model_refuses_a_vision_only_checkpoint(tmp_path):
    hf_vision(seed=26).save_pretrained(tmp_path / "v")
    with pytest.raises(CheckpointError, match="VisionTower.from_pretrained"):
        SiglipModel.from_pretrained(tmp_path / "v")


def test_saved_config_is_transformers_vision_config(tmp_path):
    tower = VisionTower.from_preset("tiny")
    tower.save_pretrained(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["model_type"] == "siglip_vision_model" and cfg["architectures"] == ["SiglipVisionModel"]
    assert cfg["image_size"] == 32 and cfg["patch_size"] == 8 and cfg["vision_use_head"] is True


def test_bare_weights_file_takes_image_size_from_the_matching_preset(tmp_path):
    """No config.json: shapes give the tower, a preset of the same shape gives heads and image size."""
    from vision_tower.formats.transformers import vision_state_dict_hf

    with torch.device("meta"):
        shape = VisionTower.from_preset("so400m_p14_384")
    sd = {k: torch.zeros(v.shape) for k, v in vision_state_dict_hf(shape.state_dict()).items()}
    save_file(sd, tmp_path / "bare.safetensors")
    tower = VisionTower.from_pretrained(tmp_path / "bare.safetensors")
    assert tower.config.image_size == 384 and tower.config.num_attention_heads == 16


def test_the_decoder_of_a_paligemma_checkpoint_is_not_read(tmp_path, tensor_reads):
    pg = _tiny_paligemma()
    pg.save_pretrained(tmp_path / "pg", max_shard_size="30KB")
    assert (tmp_path / "pg" / "model.safetensors.index.json").exists()
    read = tensor_reads
    tower = VisionTower.from_pretrained(tmp_path / "pg").eval()
    assert read and all(k.startswith("vision_tower.") for k in read), sorted(set(read))[:5]
    x = _pixels()
    with torch.no_grad():
        assert_close(tower(x).patch_features, _paligemma_reference(pg, x), **TOL)


def test_unrecognised_layout_names_the_layouts_tried_and_the_first_keys(tmp_path):
    """An open_clip CLIP (not SigLIP) image tower, for instance: none of the layouts matches."""
    save_file(
        {"visual.conv1.weight": torch.zeros(4, 3, 2, 2), "visual.ln_pre.weight": torch.ones(4)},
        tmp_path / "clip.safetensors",
    )
    with pytest.raises(CheckpointError) as info:
        VisionTower.from_pretrained(tmp_path / "clip.safetensors")
    message = str(info.value)
    for layout in ("transformers", "open_clip", "timm", "big_vision"):
        assert f"{layout} (" in message, message
    assert "visual.conv1.weight" in message and "visual.ln_pre.weight" in message
    with pytest.raises(CheckpointError, match="no SigLIP checkpoint layout"):
        SiglipModel.from_pretrained(tmp_path / "clip.safetensors")


def test_loading_in_bf16_builds_no_fp32_copy_and_equals_the_cast(tmp_path):
    """``dtype=`` puts the checkpoint's tensors in place cast once; a resized table is interpolated in
    fp32."""
    ref = hf_vision(seed=3, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    ref.save_pretrained(tmp_path / "ref")
    fp32 = VisionTower.from_pretrained(tmp_path / "ref", image_size=48)
    bf16 = VisionTower.from_pretrained(tmp_path / "ref", image_size=48, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    for (name, a), (_, b) in zip(fp32.state_dict().items(), bf16.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), name  # pos_embed too: resized before the cast


def test_a_tower_from_a_state_dict_does_not_share_its_tensors():
    ref = hf_vision(seed=4, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    sd = ref.state_dict()
    tower = VisionTower.from_state_dict(sd, ref.config.to_dict())
    before = tower.pos_embed.detach().clone()
    with torch.no_grad():
        next(v for k, v in sd.items() if k.endswith("position_embedding.weight")).add_(1.0)
    assert torch.equal(tower.pos_embed, before)


def test_a_vision_language_model_folder_points_to_its_tower(tmp_path):
    """A native VLM folder (tower/, decoder/, connector weights beside a config) given where a tower goes."""
    vlm = tmp_path / "vlm"
    VisionTower(get_preset("tiny").vision).save_pretrained(vlm / "tower")
    save_file({"proj.weight": torch.zeros(4, 4)}, vlm / "connector.safetensors")
    (vlm / "config.json").write_text(json.dumps({"model_type": "vision_tower_vlm"}))
    with pytest.raises(CheckpointError, match=f"its vision tower is the folder {vlm / 'tower'}$"):
        VisionTower.from_pretrained(vlm)
    assert VisionTower.from_pretrained(vlm / "tower").config.hidden_size > 0  # the folder it names loads
