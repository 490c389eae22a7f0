"""Gemma 3's text decoder (``gemma3_text``: sliding-window and global layers): its decoder preset and the
checks of a decoder folder. The parametrized tests of test_vlm_forward.py run the family under prefix and
causal attention."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from connectors.decoder import load_decoder
from connectors.decoder_presets import decoder_config
from tests.helpers import vlm_reference as R
from vision_tower import CheckpointError


def test_tiny_gemma3_preset_has_sliding_and_global_layers():
    config = decoder_config("tiny_gemma3", R.tokenizer())
    assert config.model_type == "gemma3_text" and config.layer_types == [
        "sliding_attention",
        "full_attention",
    ]
    deeper = decoder_config("tiny_gemma3", R.tokenizer(), num_hidden_layers=4)
    assert deeper.layer_types == ["sliding_attention", "full_attention"] * 2


def test_a_gemma3_decoder_tensor_of_the_wrong_shape_is_refused_naming_it(tmp_path):
    folder = R.decoder_folder("gemma3_text", tmp_path / "dec")
    file = folder / "model.safetensors"
    name = "model.layers.1.self_attn.q_norm.weight"  # Gemma 3's query norm, (head_dim,)
    sd = load_file(file)
    sd[name] = sd[name][:8].contiguous()
    save_file(sd, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{name}: the decoder \(Gemma3ForCausalLM\) expects \(16,\)"):
        load_decoder(folder)
