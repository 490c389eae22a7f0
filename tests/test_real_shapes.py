"""The real-shape decoder presets (``preset:gemma_2b``, ``preset:qwen2_1_5b``) that benchmarks/real_shapes.py
runs the shipped recipes with: their configs are the hub models' and their parameter counts the models'
known ones, counted on the meta device (nothing materialised)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from connectors.decoder_presets import decoder_config
from training.demo.decoders import word_tokenizer

# the fields of google/gemma-2b's and Qwen/Qwen2-1.5B-Instruct's config.json, in its (alphabetical) order
REFERENCE = {
    "gemma_2b": {
        "head_dim": 256,
        "hidden_size": 2048,
        "intermediate_size": 16384,
        "max_position_embeddings": 8192,
        "model_type": "gemma",
        "num_attention_heads": 8,
        "num_hidden_layers": 18,
        "num_key_value_heads": 1,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "vocab_size": 256000,
    },
    "qwen2_1_5b": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "max_position_embeddings": 32768,
        "model_type": "qwen2",
        "num_attention_heads": 12,
        "num_hidden_layers": 28,
        "num_key_value_heads": 2,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "vocab_size": 151936,
    },
}


def _gemma_2b_params() -> int:
    h, i, layers, q, kv, d, vocab = 2048, 16384, 18, 8, 1, 256, 256000
    attention = h * q * d * 2 + h * kv * d * 2  # q, o; k, v (no biases)
    layer = attention + 3 * h * i + 2 * h  # gate, up, down; two norms
    return vocab * h + layers * layer + h  # tied embedding, final norm


def _qwen2_1_5b_params() -> int:
    h, i, layers, kv_width, vocab = 1536, 8960, 28, 2 * 128, 151936
    attention = (h * h + h) + 2 * (h * kv_width + kv_width) + h * h  # q, k, v with biases; o without
    layer = attention + 3 * h * i + 2 * h
    return vocab * h + layers * layer + h


@pytest.mark.parametrize(
    "name, params",
    [("gemma_2b", _gemma_2b_params()), ("qwen2_1_5b", _qwen2_1_5b_params())],
)
def test_real_shape_presets_are_the_hub_models_shapes(name: str, params: int) -> None:
    tok = word_tokenizer(["a small caption"])  # 8 ids: far fewer than the model's vocabulary
    config = decoder_config(name, tok)
    expected = REFERENCE[name]
    got = {k: getattr(config, k, None) for k in expected if k != "rope_theta"}
    got["rope_theta"] = config.rope_parameters["rope_theta"]
    assert got == expected
    # the special ids are the tokenizer's, whose every id is a row of the model's (larger) vocabulary
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == params  # 2.51e9 and 1.54e9
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_a_tokenizer_larger_than_the_preset_vocabulary_widens_it(monkeypatch) -> None:
    from connectors import decoder_presets

    tok = word_tokenizer([" ".join(f"w{k}" for k in range(200))])  # 205 ids with the special tokens
    model_type, fields = decoder_presets.DECODER_PRESETS["qwen2_1_5b"]
    small = ("qwen2", {**fields, "vocab_size": 100})
    monkeypatch.setitem(decoder_presets.DECODER_PRESETS, "small_vocab", small)
    assert decoder_config("small_vocab", tok).vocab_size == len(tok) == 205
    assert decoder_config("qwen2_1_5b", tok).vocab_size == 151936
    assert decoder_config("qwen2_1_5b", tok, vocab_size=300).vocab_size == 300  # an override is kept
    assert decoder_config("tiny_gemma", tok).vocab_size == len(tok)  # tiny presets: the tokenizer's size
