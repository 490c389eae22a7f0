"""big_vision ``.npz`` trees in: built here from transformers reference weights in the published layout
(the inverse of transformers' convert_siglip_to_hf.py / convert_siglip2_to_hf.py), then read by us
and, as a check that the tree is laid out as the world reads it, by timm's big_vision loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from tests.helpers.hf_reference import hf_naflex, hf_siglip
from vision_tower import CheckpointError, NaFlexVisionTower, SiglipModel, VisionTower

TOL = dict(atol=1e-5, rtol=1e-5)
LOGITS = dict(atol=1e-4, rtol=1e-4)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().numpy().copy()


def _dense(tree: dict, path: str, sd: dict, name: str) -> None:
    tree[f"{path}/kernel"] = _np(sd[f"{name}.weight"]).T  # torch (out, in) -> flax (in, out)
    tree[f"{path}/bias"] = _np(sd[f"{name}.bias"])


def _norm(tree: dict, path: str, sd: dict, name: str) -> None:
    tree[f"{path}/scale"] = _np(sd[f"{name}.weight"])
    tree[f"{path}/bias"] = _np(sd[f"{name}.bias"])


def _attention(tree: dict, path: str, q, k, v, out_w, out_b, heads: int) -> None:
    """Per-head flax attention: query/key/value kernels (D, H, hd), biases (H, hd), out (H, hd, D)."""
    for name, (w, b) in zip(("query", "key", "value"), (q, k, v)):
        dim = w.shape[1]
        tree[f"{path}/{name}/kernel"] = _np(w).T.reshape(dim, heads, -1)
        tree[f"{path}/{name}/bias"] = _np(b).reshape(heads, -1)
    tree[f"{path}/out/kernel"] = _np(out_w).T.reshape(heads, -1, out_w.shape[0])
    tree[f"{path}/out/bias"] = _np(out_b)


def _encoder(tree: dict, root: str, sd: dict, prefix: str, depth: int, heads: int, scan: bool) -> None:
    blocks = []
    for i in range(depth):
        b, p = {}, f"{prefix}encoder.layers.{i}."
        _norm(b, "LayerNorm_0", sd, p + "layer_norm1")
        _norm(b, "LayerNorm_1", sd, p + "layer_norm2")
        qkv = [(sd[f"{p}self_attn.{n}_proj.weight"], sd[f"{p}self_attn.{n}_proj.bias"]) for n in "qkv"]
        a = p + "self_attn.out_proj"
        _attention(b, "MultiHeadDotProductAttention_0", *qkv, sd[a + ".weight"], sd[a + ".bias"], heads)
        _dense(b, "MlpBlock_0/Dense_0", sd, p + "mlp.fc1")
        _dense(b, "MlpBlock_0/Dense_1", sd, p + "mlp.fc2")
        blocks.append(b)
    if scan:  # one subtree, every array with a leading depth axis
        for key in blocks[0]:
            tree[f"{root}/encoderblock/{key}"] = np.stack([b[key] for b in blocks])
    else:
        for i, b in enumerate(blocks):
            tree.update({f"{root}/encoderblock_{i}/{k}": v for k, v in b.items()})


def vision_tree(sd: dict, prefix: str, cfg, scan: bool = False, naflex: bool = False) -> dict:
    """A transformers SigLIP (or Siglip2 NaFlex) image tower under ``prefix`` -> ``params/img/...``."""
    t, heads = {}, cfg.num_attention_heads
    w = sd[prefix + "embeddings.patch_embedding.weight"]
    # Conv kernel (p, p, C, D); NaFlex: Dense over (row, col, channel) patches, (p*p*C, D)
    t["embedding/kernel"] = _np(w).T if naflex else _np(w).transpose(2, 3, 1, 0)
    t["embedding/bias"] = _np(sd[prefix + "embeddings.patch_embedding.bias"])
    pos = _np(sd[prefix + "embeddings.position_embedding.weight"])
    side = int(round(pos.shape[0] ** 0.5))
    t["pos_embedding"] = pos.reshape(side, side, -1) if naflex else pos[None]  # NaFlex: the (h, w, D) grid
    _encoder(t, "Transformer", sd, prefix, cfg.num_hidden_layers, heads, scan)
    _norm(t, "Transformer/encoder_norm", sd, prefix + "post_layernorm")
    h = prefix + "head."
    t["MAPHead_0/probe"] = _np(sd[h + "probe"])
    wq, wk, wv = sd[h + "attention.in_proj_weight"].chunk(3)
    bq, bk, bv = sd[h + "attention.in_proj_bias"].chunk(3)
    a = h + "attention.out_proj"
    _attention(
        t,
        "MAPHead_0/MultiHeadDotProductAttention_0",
        (wq, bq),
        (wk, bk),
        (wv, bv),
        sd[a + ".weight"],
        sd[a + ".bias"],
        heads,
    )
    _norm(t, "MAPHead_0/LayerNorm_0", sd, h + "layernorm")
    _dense(t, "MAPHead_0/MlpBlock_0/Dense_0", sd, h + "mlp.fc1")
    _dense(t, "MAPHead_0/MlpBlock_0/Dense_1", sd, h + "mlp.fc2")
    return {f"params/img/{k}": v for k, v in t.items()}


def siglip_tree(model, scan: bool = False) -> dict:
    """A transformers SiglipModel -> the two-tower big_vision tree (img, txt, t, b)."""
    sd, cfg = model.state_dict(), model.config
    tree = vision_tree(sd, "vision_model.", cfg.vision_config, scan)
    t, tc = {}, cfg.text_config
    t["Embed_0/embedding"] = _np(sd["text_model.embeddings.token_embedding.weight"])
    t["pos_embedding"] = _np(sd["text_model.embeddings.position_embedding.weight"])[None]
    _encoder(t, "Encoder_0", sd, "text_model.", tc.num_hidden_layers, tc.num_attention_heads, scan)
    _norm(t, "Encoder_0/encoder_norm", sd, "text_model.final_layer_norm")
    _dense(t, "head", sd, "text_model.head")
    tree.update({f"params/txt/{k}": v for k, v in t.items()})
    tree["params/t"] = _np(sd["logit_scale"])
    tree["params/b"] = _np(sd["logit_bias"])
    return tree


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_big_vision_siglip_loads_with_equal_outputs(scan, tmp_path):
    ref = hf_siglip(seed=7, vision=dict(num_hidden_layers=3))
    np.savez(tmp_path / "siglip.npz", **siglip_tree(ref, scan))
    ours = SiglipModel.from_pretrained(tmp_path / "siglip.npz").eval()
    assert (
        ours.config.vision.num_attention_heads == 4 and ours.config.vision.hidden_act == "gelu_pytorch_tanh"
    )
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        r = ref(pixel_values=x, input_ids=ids)
        o = ours(x, ids)
        tower = VisionTower.from_pretrained(tmp_path / "siglip.npz").eval()(x)
        rv = ref.vision_model(x)
    assert_close(o.logits_per_image, r.logits_per_image, **LOGITS)
    assert_close(tower.patch_features, rv.last_hidden_state, **TOL)
    assert_close(tower.pooled, rv.pooler_output, **TOL)


def test_the_tree_is_what_timm_reads_from_big_vision_files(tmp_path):
    """timm's own .npz loader puts the same tree into a timm model that equals ours."""
    timm = pytest.importorskip("timm")
    ref = hf_siglip(seed=8)
    np.savez(tmp_path / "siglip.npz", **siglip_tree(ref, scan=True))
    model = timm.create_model(
        "vit_base_patch16_siglip_224",
        pretrained=False,
        num_classes=0,
        patch_size=8,
        img_size=32,
        embed_dim=48,
        depth=2,
        num_heads=4,
        mlp_ratio=80 / 48,
        act_layer="gelu_tanh",
    ).eval()
    model.load_pretrained(str(tmp_path / "siglip.npz"))
    ours = VisionTower.from_pretrained(tmp_path / "siglip.npz").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(ours(x).patch_features, model.forward_features(x), **TOL)
        assert_close(ours(x).pooled, model(x), **TOL)


def test_big_vision_naflex_tower(tmp_path):
    ref = hf_naflex(num_hidden_layers=2, patch_size=4)
    np.savez(tmp_path / "naflex.npz", **vision_tree(ref.state_dict(), "", ref.config, naflex=True))
    ours = NaFlexVisionTower.from_pretrained(tmp_path / "naflex.npz").eval()
    assert (ours.config.patch_size, ours.config.num_patches, ours.config.num_attention_heads) == (4, 16, 4)
    shapes = torch.tensor([[3, 5], [6, 2]])
    mask = (torch.arange(20)[None] < shapes.prod(-1)[:, None]).int()
    x = torch.randn(2, 20, 48) * mask[..., None]
    with torch.no_grad():
        r = ref(pixel_values=x, pixel_attention_mask=mask, spatial_shapes=shapes)
        o = ours(x, shapes, mask)
    assert_close(o.patch_features, r.last_hidden_state, **TOL)
    assert_close(o.pooled, r.pooler_output, **TOL)
    with pytest.raises(CheckpointError, match="NaFlex"):
        VisionTower.from_pretrained(tmp_path / "naflex.npz")


def test_an_incomplete_tree_names_what_is_missing(tmp_path):
    tree = siglip_tree(hf_siglip(seed=9))
    tree["params/img/Transformer/encoderblock_1/MlpBlock_0/Dense_9/kernel"] = np.zeros(2, np.float32)
    np.savez(tmp_path / "extra.npz", **tree)
    with pytest.raises(CheckpointError, match="unexpected keys.*encoderblock_1/MlpBlock_0/Dense_9/kernel"):
        VisionTower.from_pretrained(tmp_path / "extra.npz")
    del tree["params/img/Transformer/encoderblock_1/MlpBlock_0/Dense_9/kernel"]
    del tree["params/txt/head/kernel"]
    np.savez(tmp_path / "no_text_head.npz", **tree)
    with pytest.raises(CheckpointError, match="VisionTower.from_pretrained"):
        SiglipModel.from_pretrained(tmp_path / "no_text_head.npz")
