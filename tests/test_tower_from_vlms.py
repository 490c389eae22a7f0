"""The SigLIP tower read out of Idefics3, SmolVLM and Gemma 3 checkpoints gives the features of the model's
own vision transformer (tiny random transformers models, saved as transformers does and in 4.x keys)."""

from __future__ import annotations

import dataclasses
import json

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from tests.helpers.hf_reference import randomize_
from tests.helpers.hub import hub_cache
from vision_tower import VisionConfig, VisionTower
from vision_tower.cli import main
from vision_tower.formats import idefics3
from vision_tower.sources import load_tower

TOL = dict(atol=1e-5, rtol=1e-5)
# 25 patches a side: a grid where Idefics3's float32 position bucketing is not the identity
SIDE, PATCH = 25, 4
SIZE = SIDE * PATCH
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
DECODER.update(num_key_value_heads=1, vocab_size=300, max_position_embeddings=128)


def _vlm(kind: str, seed: int = 0, scale_factor: int = 5, **vision):
    """A random ``Idefics3``/``SmolVLM``/``Gemma3ForConditionalGeneration`` with a tower of :data:`TOWER`
    (``vision``: overrides) at :data:`SIZE` px; Idefics3's pixel shuffle by ``scale_factor``."""
    import transformers as T

    vision = {**TOWER, "image_size": SIZE, "patch_size": PATCH, **vision}
    if kind == "gemma3":
        text = {**DECODER, "model_type": "gemma3_text", "head_dim": 16}
        cfg = T.Gemma3Config(
            text_config=text,
            vision_config={**vision, "vision_use_head": False},
            image_token_index=299,
            mm_tokens_per_image=25,
        )
        model_class = T.Gemma3ForConditionalGeneration
    else:
        config_class, model_class = {
            "idefics3": (T.Idefics3Config, T.Idefics3ForConditionalGeneration),
            "smolvlm": (T.SmolVLMConfig, T.SmolVLMForConditionalGeneration),
        }[kind]
        cfg = config_class(
            text_config={**DECODER, "model_type": "llama"},
            vision_config=vision,
            scale_factor=scale_factor,
            image_token_id=299,
        )
    torch.manual_seed(seed)
    return randomize_(model_class(cfg).eval(), seed)


def _pixels(size: int = SIZE) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _reference(model, x: torch.Tensor) -> torch.Tensor:
    """(B, N, D): the encoder output the model's own image path hands its connector (``get_image_features``:
    Idefics3/SmolVLM take a batch of image lists and no padding mask, i.e. whole images)."""
    if model.config.model_type == "gemma3":
        return model.model.get_image_features(x).last_hidden_state
    return model.model.get_image_features(x[:, None]).last_hidden_state


def _retype(folder, tower_prefix: str, saved_prefix: str) -> None:
    """Move the tower's tensors in ``folder`` from ``saved_prefix`` to ``tower_prefix`` (another
    transformers version's keys)."""
    weights = folder / "model.safetensors"
    sd = load_file(weights)
    assert any(k.startswith(saved_prefix) for k in sd), sorted(sd)[:5]
    moved = {tower_prefix + k[len(saved_prefix) :]: v for k, v in sd.items() if k.startswith(saved_prefix)}
    save_file({**{k: v for k, v in sd.items() if not k.startswith(saved_prefix)}, **moved}, weights)


# (kind, tower key prefix written, the prefix transformers 5 saves the tower under)
LAYOUTS = [
    ("idefics3", None, "model.vision_model."),  # one layout in 4.x and 5.x saves
    ("smolvlm", None, "model.vision_model."),
    ("gemma3", None, "vision_tower."),  # as transformers 5 saves (SiglipVisionModel without its infix)
    ("gemma3", "vision_tower.vision_model.", "vision_tower."),  # 4.x saves
    ("gemma3", "model.vision_tower.vision_model.", "vision_tower."),  # 5.0 in-memory keys
]


@pytest.mark.parametrize(("kind", "prefix", "saved"), LAYOUTS)
def test_tower_out_of_a_saved_vlm_equals_its_vision_transformer(kind, prefix, saved, tmp_path):
    model = _vlm(kind)
    model.save_pretrained(tmp_path / kind)
    if prefix is not None:
        _retype(tmp_path / kind, prefix, saved)
    x = _pixels()
    expected = _reference(model, x)  # (2, 625, 32)
    for tower in (VisionTower.from_pretrained(tmp_path / kind), load_tower(tmp_path / kind)):
        assert tower.head is None and tower.config.image_size == SIZE
        with torch.no_grad():
            out = tower.eval()(x)
        assert out.grid == (SIDE, SIDE)
        assert_close(out.patch_features, expected, **TOL)


@pytest.mark.parametrize("kind", ["idefics3", "gemma3"])
def test_tower_out_of_an_in_memory_vlm_state_dict(kind):
    """``from_state_dict(model.state_dict(), model.config.to_dict())``: transformers 5's in-memory keys."""
    model = _vlm(kind, seed=1)
    tower = VisionTower.from_state_dict(model.state_dict(), model.config.to_dict()).eval()
    x = _pixels()
    with torch.no_grad():
        assert_close(tower(x).patch_features, _reference(model, x), **TOL)


def test_idefics3_position_lookup_equals_transformers_on_full_grids():
    """The bucketing replica gives the rows transformers' ``Idefics3VisionEmbeddings`` reads for a full
    image, on every side up to 64: the identity on most, not on 25 (the tests' grid) and a few others."""
    from transformers import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings

    not_identity = []
    for side in range(1, 65):
        emb = Idefics3VisionEmbeddings(
            Idefics3VisionConfig(hidden_size=1, image_size=side, patch_size=1, num_channels=1)
        )
        with torch.no_grad():
            emb.patch_embedding.weight.zero_()
            emb.patch_embedding.bias.zero_()
            emb.position_embedding.weight.copy_(torch.arange(side * side, dtype=torch.float32)[:, None])
            full = torch.ones(1, side, side, dtype=torch.bool)
            ids = emb(torch.zeros(1, 1, side, side), full)[0, :, 0].round().long()  # (side * side,)
        rows = idefics3.position_rows(side, side)
        assert torch.equal(ids, (rows[:, None] * side + rows[None, :]).reshape(-1)), side
        if not torch.equal(rows, torch.arange(side)):
            not_identity.append(side)
    assert SIDE in not_identity and not {26, 27, 32} & set(not_identity), not_identity


def test_released_smolvlm_config_fields_and_the_hub_cache(tmp_path, monkeypatch, capsys):
    """A config.json written like the released SmolVLM ones (class defaults left out, image-processor
    keys in ``vision_config``) loads by repo id from an offline hub cache; ``info`` names its model."""
    from transformers import SmolVLMConfig, SmolVLMVisionConfig

    defaults = SmolVLMVisionConfig()
    for name, value in idefics3.DEFAULTS.items():  # the defaults we fill in are transformers'
        assert getattr(defaults, name) == value, name
    model = _vlm(  # 16 heads, 32 px patches, 224 px: 7x7 patches
        "smolvlm",
        seed=2,
        scale_factor=7,
        num_attention_heads=defaults.num_attention_heads,
        patch_size=defaults.patch_size,
        image_size=defaults.image_size,
        intermediate_size=defaults.intermediate_size,
    )
    model.save_pretrained(tmp_path / "src")
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["vision_config"] = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "model_type": "smolvlm_vision",
        "max_image_size": {"longest_edge": 224},
        "size": {"longest_edge": 896},
        "tie_word_embeddings": False,
        "use_base_siglip": False,
    }
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    read_back = SmolVLMConfig.from_pretrained(tmp_path / "src").vision_config
    shape = [f.name for f in dataclasses.fields(VisionConfig) if f.name != "use_head"]
    assert {k: getattr(read_back, k) for k in shape} == {
        k: getattr(model.config.vision_config, k) for k in shape
    }  # transformers reads the same tower from it
    hub_cache(tmp_path / "hub", "HuggingFaceTB/SmolVLM-tiny-test", tmp_path / "src")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tower = load_tower("HuggingFaceTB/SmolVLM-tiny-test").eval()
    assert tower.config.num_attention_heads == 16 and tower.config.image_size == 224
    x = _pixels(224)
    with torch.no_grad():
        assert_close(tower(x).patch_features, _reference(model, x), **TOL)

    import vision_tower.cli as cli

    real_hook = cli.hook  # a core install: no package describes VLM checkpoints, info reads the tower
    monkeypatch.setattr(cli, "hook", lambda name: None if name == "describe_vlm" else real_hook(name))
    assert main(["info", "HuggingFaceTB/SmolVLM-tiny-test"]) == 0
    out = capsys.readouterr().out
    params = sum(p.numel() for p in model.model.vision_model.parameters())
    assert "(image tower of this smolvlm model; the rest is not read)" in out, out
    assert f"parameters: {params / 1e6:.2f}M (pooling head 0.00M)" in out, out
    assert '"num_attention_heads": 16' in out and "224 px: 7x7 = 49 tokens  <- native" in out, out


def test_the_decoder_and_connector_of_an_idefics3_checkpoint_are_not_read(tmp_path, tensor_reads):
    _vlm("idefics3", seed=3).save_pretrained(tmp_path / "m")
    read = tensor_reads
    VisionTower.from_pretrained(tmp_path / "m")
    assert read and all(k.startswith("model.vision_model.") for k in read), sorted(set(read))
