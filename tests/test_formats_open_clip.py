"""open_clip SigLIP checkpoints in and out: parity with open_clip's CustomTextCLIP on tiny random weights.

open_clip builds the image tower from a timm architecture name alone, so the tiny tower is a timm
architecture registered here (in timm and in our table), shaped like transformers' tiny test tower.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from tests.helpers.hf_reference import hf_siglip, randomize_
from vision_tower import SiglipModel, VisionTower
from vision_tower.cli import main
from vision_tower.formats import timm as timm_format

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
logging.getLogger("root").setLevel(logging.ERROR)  # open_clip logs "no pretrained weights" on every build

TINY = "vit_test_patch8_siglip_32"  # patch 8, width 48, 2 blocks, 4 heads, mlp 80, 32 px, tanh GELU, MAP head
TOL = dict(atol=1e-5, rtol=1e-5)
LOGITS = dict(atol=1e-4, rtol=1e-4)


def _register_tiny_arch() -> None:
    timm_format.register_timm_arch(TINY, timm_format.TimmArch(8, 48, 2, 4, 80, 32, "gelu_pytorch_tanh", True))
    if TINY in timm.list_models():
        return
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    def vit_test_patch8_siglip_32(pretrained=False, **kwargs):
        args = dict(patch_size=8, embed_dim=48, depth=2, num_heads=4, mlp_ratio=80 / 48, img_size=32)
        args.update(class_token=False, global_pool="map", act_layer="gelu_tanh")
        return _create_vision_transformer(TINY, pretrained=pretrained, **dict(args, **kwargs))

    register_model(vit_test_patch8_siglip_32)


_register_tiny_arch()


def model_cfg(tanh_text: bool = False) -> dict:
    """ViT-B-16-SigLIP's recipe with the tiny tower: bidirectional text, last-token pooling, eps 1e-6."""
    cfg = open_clip.get_model_config("ViT-B-16-SigLIP")
    cfg["embed_dim"] = 48
    cfg["vision_cfg"].update(image_size=32, timm_model_name=TINY)
    text = dict(context_length=12, vocab_size=97, width=40, heads=4, layers=2)
    cfg["text_cfg"].update(text, hf_tokenizer_name=None)
    if tanh_text:  # as ViT-*-SigLIP2
        cfg["text_cfg"]["act_kwargs"] = {"approximate": "tanh"}
    return cfg


def tiny_open_clip(cfg: dict, seed: int = 0):
    torch.manual_seed(seed)
    kwargs = {
        k: v for k, v in cfg.items() if k != "custom_text"
    }  # create_model's own switch, not the model's
    model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None, **kwargs).eval()
    randomize_(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(2.1)
        model.logit_bias.fill_(-8.5)
    return model


def save_open_clip(model, cfg: dict, folder) -> None:
    """The hub layout open_clip's save_for_hf writes (weights + open_clip_config.json)."""
    from open_clip.push_to_hf_hub import save_config_for_hf

    folder.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    save_config_for_hf(model, folder / "open_clip_config.json", model_config=cfg)


def _inputs(n_img: int = 3, n_txt: int = 4):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n_img, 3, 32, 32, generator=gen), torch.randint(0, 97, (n_txt, 12), generator=gen)


def _open_clip_outputs(model, x, ids):
    with torch.no_grad():
        img = model.encode_image(x)
        txt = model.encode_text(ids)
        logits = (
            model.logit_scale.exp()
            * torch.nn.functional.normalize(img, dim=-1)
            @ torch.nn.functional.normalize(txt, dim=-1).t()
            + model.logit_bias
        )
        tokens = model.visual.trunk.forward_features(x)
    return tokens, img, logits


@pytest.mark.parametrize("tanh_text", [False, True], ids=["siglip_exact_gelu_text", "siglip2_tanh_text"])
def test_open_clip_checkpoint_loads_with_equal_outputs(tanh_text, tmp_path):
    cfg = model_cfg(tanh_text)
    ref = tiny_open_clip(cfg)
    save_open_clip(ref, cfg, tmp_path)
    ours = SiglipModel.from_pretrained(tmp_path).eval()
    assert ours.config.text.hidden_act == ("gelu_pytorch_tanh" if tanh_text else "gelu")
    assert ours.config.vision.hidden_act == "gelu_pytorch_tanh" and ours.config.text.layer_norm_eps == 1e-6
    x, ids = _inputs()
    tokens, pooled, logits = _open_clip_outputs(ref, x, ids)
    with torch.no_grad():
        out = ours(x, ids)
        o = ours.vision(x)
    assert_close(out.logits_per_image, logits, **LOGITS)
    assert_close(o.patch_features, tokens, **TOL)
    assert_close(o.pooled, pooled, **TOL)
    tower = VisionTower.from_pretrained(tmp_path).eval()  # the image tower alone, text never read
    with torch.no_grad():
        assert_close(tower(x).pooled, pooled, **TOL)
    ours.save_pretrained(tmp_path / "hf")  # open_clip -> transformers: the GELU variants travel along
    hf = transformers.SiglipModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert_close(hf(pixel_values=x, input_ids=ids).logits_per_image, logits, **LOGITS)


def test_round_trip_through_the_open_clip_layout(tmp_path):
    cfg = model_cfg()
    save_open_clip(tiny_open_clip(cfg, seed=4), cfg, tmp_path / "src")
    ours = SiglipModel.from_pretrained(tmp_path / "src").eval()
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--to", "open_clip"]) == 0
    x, ids = _inputs()
    with torch.no_grad():
        expected = ours(x, ids).logits_per_image
    written = json.loads((tmp_path / "out" / "open_clip_config.json").read_text())["model_cfg"]
    written.pop("custom_text")
    by_dir = open_clip.create_model(f"local-dir:{tmp_path / 'out'}").eval()
    by_file = open_clip.create_model(
        "ViT-B-16-SigLIP", pretrained=str(tmp_path / "out" / "open_clip_model.safetensors"), **written
    ).eval()
    for model in (by_dir, by_file):
        assert_close(_open_clip_outputs(model, x, ids)[2], expected, **LOGITS)
    again = SiglipModel.from_pretrained(tmp_path / "out")
    for k, v in ours.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_transformers_siglip_converts_to_open_clip(tmp_path):
    """transformers SiglipModel -> open_clip, when a timm architecture of the tower's shape is registered."""
    ref = hf_siglip(seed=6)
    ref.save_pretrained(tmp_path / "hf")
    SiglipModel.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "oc", format="open_clip")
    model = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    x, ids = _inputs()
    with torch.no_grad():
        expected = ref(pixel_values=x, input_ids=ids).logits_per_image
    assert_close(_open_clip_outputs(model, x, ids)[2], expected, **LOGITS)


def test_open_clip_errors(tmp_path):
    from vision_tower import CheckpointError

    cfg = model_cfg()
    save_open_clip(tiny_open_clip(cfg), cfg, tmp_path / "m")
    (tmp_path / "m" / "open_clip_config.json").unlink()
    with pytest.raises(CheckpointError, match="open_clip_config.json"):
        SiglipModel.from_pretrained(tmp_path / "m")
    odd = SiglipModel.from_preset("tiny")  # width 64: no timm architecture has this shape
    with pytest.raises(ValueError, match="no registered one has this shape.*width 64"):
        odd.save_pretrained(tmp_path / "x", format="open_clip")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="timm checkpoints hold the image tower only"):
        odd.save_pretrained(tmp_path / "x", format="timm")


def test_hub_repo_id_from_the_offline_cache(tmp_path, monkeypatch):
    """SiglipModel.from_pretrained("timm/ViT-B-16-SigLIP") reads open_clip's hub layout (here from the
    cache)."""
    import huggingface_hub.constants

    cfg = model_cfg()
    ref = tiny_open_clip(cfg, seed=7)
    commit = "0" * 40
    repo = tmp_path / "models--timm--ViT-B-16-SigLIP"
    save_open_clip(ref, cfg, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    ours = SiglipModel.from_pretrained("timm/ViT-B-16-SigLIP", cache_dir=tmp_path).eval()
    x, ids = _inputs()
    with torch.no_grad():
        assert_close(ours(x, ids).logits_per_image, _open_clip_outputs(ref, x, ids)[2], **LOGITS)


def test_a_gelu_change_for_open_clip_needs_consent(tmp_path):
    """A tower whose shape timm only builds with the other GELU: refused, unless asked for (the CLI flag)."""
    hf_siglip(seed=8, vision=dict(hidden_act="gelu")).save_pretrained(tmp_path / "hf")  # exact GELU tower
    ours = SiglipModel.from_pretrained(tmp_path / "hf").eval()
    with pytest.raises(ValueError, match=f"{TINY} has this shape with the other GELU.*allow_gelu_change"):
        ours.save_pretrained(tmp_path / "refused", format="open_clip")
    args = ["convert", str(tmp_path / "hf"), str(tmp_path / "oc"), "--to", "open_clip", "--allow-gelu-change"]
    assert main(args) == 0
    model = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    back = SiglipModel.from_pretrained(tmp_path / "oc").eval()
    assert back.config.vision.hidden_act == "gelu_pytorch_tanh"  # what open_clip now computes
    x, ids = _inputs()
    with torch.no_grad():
        theirs = _open_clip_outputs(model, x, ids)[2]
        assert_close(back(x, ids).logits_per_image, theirs, **LOGITS)
        change = (ours(x, ids).logits_per_image - theirs).abs().max().item()
    assert 0 < change < 0.1, change
