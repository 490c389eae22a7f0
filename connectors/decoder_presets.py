"""Decoders of registered shapes with random weights (``preset:tiny_gemma`` as a training config's
``model.decoder``), sized to a tokenizer: what tests and the demo train without downloading a language
model. The tiny presets take the tokenizer's vocabulary; the real-shape ones (``gemma_2b``,
``qwen2_1_5b``: the shapes of google/gemma-2b and Qwen/Qwen2-1.5B-Instruct, for measuring a recipe at its
real size without its weights) keep their model's vocabulary, which any smaller tokenizer fits inside."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

PRESET_PREFIX = "preset:"
_TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
}
# name -> (model_type, config fields): a closed set, as the tower presets
DECODER_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny_gemma": ("gemma", _TINY),
    # Gemma 3's text decoder: a sliding-window layer then a global one (the pattern repeats for more layers),
    # a window that the tiny models' sequences exceed, queries scaled by 1/sqrt(head_dim)
    "tiny_gemma3": (
        "gemma3_text",
        {**_TINY, "sliding_window_pattern": 2, "sliding_window": 16, "query_pre_attn_scalar": 16},
    ),
    "tiny_qwen2": ("qwen2", {**_TINY, "tie_word_embeddings": False}),
    "tiny_llama": ("llama", {**_TINY, "tie_word_embeddings": False}),
    # google/gemma-2b's config.json: multi-query attention (one key/value head), tied embeddings
    "gemma_2b": (
        "gemma",
        {
            "vocab_size": 256000,
            "hidden_size": 2048,
            "intermediate_size": 16384,
            "num_hidden_layers": 18,
            "num_attention_heads": 8,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "hidden_act": "gelu_pytorch_tanh",
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "tie_word_embeddings": True,
        },
    ),
    # Qwen/Qwen2-1.5B-Instruct's config.json (head_dim 1536 / 12 = 128; q/k/v biases are Qwen2's own)
    "qwen2_1_5b": (
        "qwen2",
        {
            "vocab_size": 151936,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "tie_word_embeddings": True,
            "use_sliding_window": False,
        },
    ),
}

__all__ = ["DECODER_PRESETS", "PRESET_PREFIX", "build_decoder", "decoder_config", "preset_decoder_name"]


def preset_decoder_name(src: str | None) -> str | None:
    """``NAME`` of a ``preset:NAME`` decoder source, else None."""
    return src[len(PRESET_PREFIX) :] if src and str(src).startswith(PRESET_PREFIX) else None


def decoder_config(name: str, tokenizer: Any, **overrides: Any) -> PretrainedConfig:
    """The transformers config of preset ``name``, its pad/bos/eos ids the tokenizer's; its vocabulary the
    tokenizer's (the image token included), or for a preset that names its own (a real model's) the larger
    of the two, so that every id of the tokenizer is a row; ``overrides`` replace preset fields."""
    if name not in DECODER_PRESETS:
        raise KeyError(f"unknown decoder preset {name!r}; known: {', '.join(sorted(DECODER_PRESETS))}")
    model_type, fields = DECODER_PRESETS[name]
    ids = {
        "vocab_size": max(len(tokenizer), fields.get("vocab_size", 0)),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    known = AutoConfig.for_model(model_type).to_dict()
    unknown = sorted(set(overrides) - set(known))
    if unknown:  # transformers would keep them as attributes nobody reads
        raise ValueError(
            f"decoder preset {name!r}: unknown option(s) {unknown} for a {model_type} config; "
            f"its fields: {', '.join(sorted(k for k in known if not k.startswith('_')))}"
        )
    try:
        config = AutoConfig.for_model(model_type, **{**fields, **ids, **overrides})
    except (TypeError, ValueError) as err:
        raise ValueError(f"decoder preset {name!r} with overrides {overrides}: {err}") from err
    heads, width = config.num_attention_heads, config.hidden_size
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if getattr(config, "head_dim", None) is None and width % heads:
        raise ValueError(
            f"decoder preset {name!r}: hidden_size {width} is not divisible by num_attention_heads {heads}"
        )
    if heads % kv_heads:
        raise ValueError(
            f"decoder preset {name!r}: num_attention_heads {heads} is not a multiple of "
            f"num_key_value_heads {kv_heads} (grouped-query attention shares each key/value head)"
        )
    return config


def build_decoder(
    name: str, tokenizer: Any, *, dtype: torch.dtype | None = None, **overrides: Any
) -> PreTrainedModel:
    """A randomly initialised causal LM of preset ``name`` for ``tokenizer``, in ``dtype`` (``from_config``:
    partitioned as it is built while a ZeRO-3 ``HfDeepSpeedConfig`` is alive)."""
    return AutoModelForCausalLM.from_config(decoder_config(name, tokenizer, **overrides), dtype=dtype)
