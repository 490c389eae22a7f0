"""The decoder: a transformers causal LM loaded without random init, and what the VLM needs of it."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import logging as hf_logging
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask

from vision_tower import CheckpointError
from vision_tower.hub import check_local_or_repo_id

from .decoder_files import check_decoder_folder, read_transformers_config
from .parts import NATIVE_MODEL_TYPE

# decoder families tested end to end (forward, generate, every export format that can hold them)
FAMILIES = ("gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "llama")
IMAGE_TOKEN = "<image>"

# files that make a folder hold a tokenizer (transformers returns an empty default tokenizer without them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_TOKENIZER_PATTERNS = [
    *TOKENIZER_FILES,
    "special_tokens_map.json",
    "added_tokens.json",
    "merges.txt",
    "chat_template*",
]

# every transformers load passes these: no Python from a model folder runs, no pickle is read
NO_CODE_FROM_FILES: dict[str, Any] = {"trust_remote_code": False}


@contextlib.contextmanager
def no_code_from_files(src: str | os.PathLike) -> Iterator[None]:
    """Around a transformers load with ``trust_remote_code=False``: a folder whose classes need its own
    Python code (``auto_map`` naming a class transformers does not ship) is refused in one line, instead of
    transformers' prompt (on a terminal) or its advice to trust the code."""
    try:
        yield
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise _asks_for_code(src) from None


def _asks_for_code(src: str | os.PathLike) -> ValueError:
    return ValueError(
        f"{src}: the model folder asks to run its own Python code (auto_map) for a class that transformers "
        "does not ship; vision-tower never runs code from model files: use a model transformers supports"
    )


def _refuse_pickled_weights(src: str | os.PathLike, err: OSError) -> None:
    """transformers found no safetensors weights: name the pickled files it would otherwise have read."""
    folder = os.fspath(src)
    pickled = (
        sorted(n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth")))
        if os.path.isdir(folder)
        else []
    )
    if pickled:
        raise CheckpointError(
            f"{folder}: the decoder's weights are pickled ({', '.join(pickled)}), which vision-tower never "
            "unpickles; save them as safetensors (model.save_pretrained(dir, safe_serialization=True) where "
            "you trust the file)"
        ) from None
    raise err


# transformers 5.x renames ``past_key_values`` to ``cache``; use whichever this version takes
CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report while we check the loading info ourselves."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_decoder(
    src: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    config: PretrainedConfig | None = None,
    key_mapping: dict[str, str] | None = None,
    other_prefixes: tuple[str, ...] = (),
) -> PreTrainedModel:
    """A causal LM from a folder or hub id, through ``AutoModelForCausalLM.from_pretrained``: transformers
    builds it on the meta device and reads the safetensors shards straight into place in ``dtype``
    (``None``: the dtype it was saved in), also under an ``HfDeepSpeedConfig`` for ZeRO-3.

    For a decoder inside a multimodal checkpoint (PaliGemma, LLaVA), ``config`` is its text config and
    ``key_mapping`` (regex -> replacement) renames its tensors; every other tensor must start with one of
    ``other_prefixes``. Loading is strict: a missing, mis-shaped or unexplained key is a ``CheckpointError``.
    """
    check_local_or_repo_id(src)
    kwargs: dict[str, Any] = {
        "dtype": dtype if dtype is not None else "auto",
        "output_loading_info": True,
        "use_safetensors": True,
        **NO_CODE_FROM_FILES,
    }
    if device is not None:
        kwargs["device_map"] = str(device)
    if config is not None:
        kwargs["config"] = config
    if key_mapping is not None:
        kwargs["key_mapping"] = key_mapping
    with _quiet_transformers() if key_mapping else contextlib.nullcontext(), no_code_from_files(src):
        # config.json and the safetensors headers (dtypes, shapes) first: one line naming the file
        check_decoder_folder(src, config=config, key_mapping=key_mapping, other_prefixes=other_prefixes)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(str(src), **kwargs)
        except ValueError as err:
            if "Unrecognized configuration class" not in str(err):
                raise
            kind = getattr(config, "model_type", None)
            if kind is None and os.path.isdir(src):
                kind = read_transformers_config(Path(src)).model_type
            raise ValueError(_not_a_decoder(src, kind or "non-decoder")) from None
        except OSError as err:
            _refuse_pickled_weights(src, err)
        except SafetensorError as err:  # a hub id's files, which the check above does not see
            raise CheckpointError(f"{src}: a decoder weight file is not valid safetensors ({err})") from err
    unexpected = [k for k in info.get("unexpected_keys", ()) if not k.startswith(other_prefixes)]
    problems = {
        "missing": sorted(info.get("missing_keys", ())),
        "mis-shaped": sorted(map(str, info.get("mismatched_keys", ()))),
        "unexpected": sorted(unexpected),
        "errors": list(info.get("error_msgs", ())),
    }
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        detail = "; ".join(f"{k} ({len(v)}): {v[:20]}" for k, v in problems.items())
        raise CheckpointError(f"decoder weights in {src} do not fit {type(model).__name__}: {detail}")
    return model


def load_tokenizer(src: str | os.PathLike) -> Any | None:
    """The tokenizer saved in a folder or hub repo (``AutoTokenizer``), or None when it has no tokenizer
    files."""
    from transformers import AutoTokenizer

    from vision_tower.hub import resolve

    path = resolve(src, allow_patterns=_TOKENIZER_PATTERNS)
    if not path.is_dir() or not any((path / name).exists() for name in TOKENIZER_FILES):
        return None
    kwargs = {}
    if (path / "config.json").is_file():
        from vision_tower.checkpoint import read_json

        if read_json(path / "config.json").get("model_type") == NATIVE_MODEL_TYPE:
            # our native folder: transformers does not know its model_type and would warn while reading it
            # only to pick the tokenizer class, which tokenizer_config.json names anyway
            from transformers import PretrainedConfig

            kwargs["config"] = PretrainedConfig()
    with no_code_from_files(path):
        try:
            return AutoTokenizer.from_pretrained(str(path), **kwargs, **NO_CODE_FROM_FILES)
        except (ValueError, OSError) as err:
            # a tokenizer only its own code reads fails in transformers' fallbacks (advice to install
            # sentencepiece or tiktoken): what it asked for is the reason
            if not _asks_for_own_tokenizer_code(path):
                raise
            raise _asks_for_code(path) from err


def _asks_for_own_tokenizer_code(path: Path) -> bool:
    from vision_tower.checkpoint import read_json

    config = path / "tokenizer_config.json"
    return config.is_file() and "AutoTokenizer" in (read_json(config).get("auto_map") or {})


def config_rows(src: str | os.PathLike) -> int:
    """Rows of the input embedding table a decoder folder or hub id will have (its config's
    ``vocab_size``), read without building the model: what training checks the tokenizer against before
    any set-up."""
    from transformers import AutoConfig

    check_local_or_repo_id(src)
    with no_code_from_files(src):
        if os.path.isdir(src):
            config = read_transformers_config(Path(src))
        else:
            config = AutoConfig.from_pretrained(str(src), **NO_CODE_FROM_FILES)
    text = config.get_text_config()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if text.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not hasattr(text, "vocab_size"):
        raise ValueError(_not_a_decoder(src, text.model_type))
    return int(text.vocab_size)


def _not_a_decoder(src: str | os.PathLike, kind: str) -> str:
    return (
        f"{src} holds a {kind!r} model, not a causal language model: a decoder is a folder or hub id of "
        "a transformers causal LM (Gemma, Qwen, Llama, ...)"
    )


def family(decoder: PreTrainedModel) -> str:
    """The decoder's ``model_type`` (``gemma2``, ``qwen3``, ...)."""
    return str(decoder.config.model_type)


def num_embeddings(decoder: PreTrainedModel) -> int:
    """Rows of the input embedding table (read from the module, not the weight: ZeRO-3 empties it)."""
    return int(decoder.get_input_embeddings().num_embeddings)


def check_tokenizer_fits(
    tokenizer: Any, rows: int, *, grows_image_token: bool = True, name: str = ""
) -> None:
    """Every id the tokenizer can produce must be a row of the decoder's input embedding table (``rows``).
    A smaller tokenizer is fine (the rows past it are never fed); ``<image>`` may be the one id past the
    table when ``grows_image_token`` (a tokenizer without it gets it added as a new row, and one saved with
    it, one id past its decoder's table, is the same case); any other id past the table is refused in one
    line: silently growing the table would train random rows for a tokenizer the decoder never saw."""
    vocab = tokenizer.get_vocab()
    image = vocab.get(IMAGE_TOKEN)
    text_ids = [i for token, i in vocab.items() if token != IMAGE_TOKEN]
    top = max(text_ids, default=-1)
    image_limit = rows if grows_image_token else rows - 1
    if top < rows and (image is None or image <= image_limit):
        return
    where = f" ({name})" if name else ""
    has = f"ids up to {top}" + ("" if image is None else f" and {IMAGE_TOKEN} = {image}")
    raise ValueError(
        f"the tokenizer{where} has {len(tokenizer)} tokens ({has}) but the decoder's input embedding table "
        f"has {rows} rows: every id the tokenizer produces must be a row of the table (a smaller tokenizer "
        f"is fine, and a missing {IMAGE_TOKEN} gets one new row); use the decoder's own tokenizer, or grow "
        "and train the table first (decoder.resize_token_embeddings) and save the decoder with it"
    )


def ensure_image_token(decoder: PreTrainedModel, tokenizer: Any | None, image_token_id: int | None) -> int:
    """The image placeholder id. Without one, ``<image>`` is added to the tokenizer (if any) as a
    special token and the embedding table grows to hold it (its row is never read: the connector's
    outputs take its place). The tokenizer must fit the table (:func:`check_tokenizer_fits`).

    A given ``image_token_id`` must be a row of the decoder's input embedding table (as LLaVA's
    ``image_token_index``, a token of the vocabulary: generation masks its logit, the tokenizer names it);
    one past the table is refused rather than grown into silently: add the token to the tokenizer and
    ``decoder.resize_token_embeddings`` first, or pass none to have ``<image>`` added."""
    rows = num_embeddings(decoder)
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, rows, grows_image_token=image_token_id is None)
    if image_token_id is not None:
        if not isinstance(image_token_id, int) or image_token_id < 0:
            raise ValueError(f"image_token_id must be a non-negative int, got {image_token_id!r}")
        if image_token_id >= rows:
            raise ValueError(
                f"image_token_id {image_token_id} is past the decoder's input embedding table ({rows} rows, "
                f"ids 0..{rows - 1}): use a token of its vocabulary, resize the table first "
                f"(decoder.resize_token_embeddings), or leave image_token_id unset to have {IMAGE_TOKEN!r} "
                "added"
            )
        return image_token_id
    if tokenizer is not None:
        from transformers import AddedToken

        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens(
                [AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True
            )
        token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    else:
        token_id = rows
    if token_id >= rows:
        decoder.resize_token_embeddings(token_id + 1, mean_resizing=False)
    return token_id


def new_cache(decoder: PreTrainedModel) -> DynamicCache:
    """An empty KV cache laid out for the decoder's layers (sliding-window layers included)."""
    return DynamicCache(config=decoder.config)


def output_cache(outputs: Any) -> Any:
    return getattr(outputs, CACHE_KWARG, None)
