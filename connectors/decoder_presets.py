"""Decoders of registered shapes with random weights (``preset:tiny_gemma`` as a training config's
``model.decoder``), sized to a tokenizer: what tests and the demo train without downloading a language
model."""

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
}

__all__ = ["DECODER_PRESETS", "PRESET_PREFIX", "build_decoder", "decoder_config", "preset_decoder_name"]


def preset_decoder_name(src: str | None) -> str | None:
    """``NAME`` of a ``preset:NAME`` decoder source, else None."""
    return src[len(PRESET_PREFIX) :] if src and str(src).startswith(PRESET_PREFIX) else None


def decoder_config(name: str, tokenizer: Any, **overrides: Any) -> PretrainedConfig:
    """The transformers config of preset ``name``, its vocabulary the tokenizer's (the image token
    included) and its pad/bos/eos ids the tokenizer's; ``overrides`` replace preset fields."""
    if name not in DECODER_PRESETS:
        raise KeyError(f"unknown decoder preset {name!r}; known: {', '.join(sorted(DECODER_PRESETS))}")
    model_type, fields = DECODER_PRESETS[name]
    ids = {
        "vocab_size": len(tokenizer),
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
