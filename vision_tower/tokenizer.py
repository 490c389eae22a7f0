"""Text tokenizer of SigLIP checkpoints: sentencepiece ids equal to transformers'.

Two flavors share one class:

- ``"siglip"`` (SigLIP, ``spiece.model``): ids equal to transformers' ``SiglipTokenizer``
  with ``padding="max_length", truncation=True``: text canonicalised as in big_vision
  (lower case, ASCII punctuation removed, whitespace collapsed), ``</s>`` appended, padded
  with ``</s>``.
- ``"gemma"`` (SigLIP 2, Gemma ``tokenizer.model``): ids equal to transformers'
  ``Siglip2Tokenizer`` (Gemma BPE plus lower-casing), no ``<bos>``, ``<eos>`` appended,
  padded with ``<pad>``, as SigLIP 2 was trained.

Special tokens written in the text (``</s>``, ``<eos>``, ...) are kept as special tokens,
as transformers does; everything else goes through sentencepiece.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

from .checkpoint import read_json
from .hub import resolve
from .spm_proto import non_normal_pieces, user_defined_as_normal, without_dummy_prefix

SPIECE_UNDERLINE = "\u2581"
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WHITESPACE = re.compile(r"\s+")

# per flavor: model file name, special tokens, default bos/eos, transformers class written on save
_FLAVORS: dict[str, dict[str, Any]] = {
    "siglip": {
        "file": "spiece.model",
        "tokens": {"eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>", "bos_token": None},
        "add_bos_token": False,
        "tokenizer_class": "SiglipTokenizer",
    },
    "gemma": {
        "file": "tokenizer.model",
        "tokens": {"eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<bos>"},
        "add_bos_token": False,
        "tokenizer_class": "Siglip2Tokenizer",
    },
}
_CLASS_TO_FLAVOR = {
    "SiglipTokenizer": "siglip",
    "GemmaTokenizer": "gemma",
    "GemmaTokenizerFast": "gemma",
    "Siglip2Tokenizer": "gemma",
}


class Tokenizer:
    """SigLIP text tokenizer over a sentencepiece model; ``__call__`` gives ``(B, max_length)`` ids.

    ``flavor`` is ``"siglip"`` (default) or ``"gemma"`` (SigLIP 2); special tokens default to the
    flavor's and can be overridden. ``added_tokens`` maps id -> text of tokens that are matched
    whole in the input (transformers' ``added_tokens_decoder``); ``legacy=False`` turns off
    sentencepiece's dummy prefix, as transformers does for that setting.
    """

    def __init__(
        self,
        model_file: str | os.PathLike,
        max_length: int = 64,
        do_lower_case: bool = True,
        *,
        flavor: str = "siglip",
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        bos_token: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool = True,
        extra_special_tokens: Sequence[str] = (),
        added_tokens: dict[int, str] | None = None,
        padding_side: str = "right",
        truncation_side: str = "right",
        legacy: bool = True,
    ):
        if flavor not in _FLAVORS:
            raise ValueError(f"unknown tokenizer flavor {flavor!r}; known: {sorted(_FLAVORS)}")
        for name, value in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if value not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', got {value!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (text + eos), got {max_length}")
        defaults = _FLAVORS[flavor]
        given = {
            "eos_token": eos_token,
            "pad_token": pad_token,
            "unk_token": unk_token,
            "bos_token": bos_token,
        }
        self.flavor = flavor
        self.max_length = int(max_length)
        self.do_lower_case = bool(do_lower_case)
        self.add_bos_token = defaults["add_bos_token"] if add_bos_token is None else bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.legacy = bool(legacy)
        self.special_tokens = {
            k: (given[k] if given[k] is not None else v) for k, v in defaults["tokens"].items()
        }
        self.extra_special_tokens = list(extra_special_tokens)
        self.model_file = Path(model_file)
        self._proto = self.model_file.read_bytes()
        self.sp = _load_sentencepiece(self._proto, legacy=self.legacy, flavor=flavor)
        self._build_added_tokens(added_tokens or {})

    # ------------------------------------------------------------------ vocabulary
    def _build_added_tokens(self, added: dict[int, str]) -> None:
        """Token text -> id for every token matched whole in the input (specials included)."""
        self.added_tokens = {str(text): int(index) for index, text in sorted(added.items())}
        if self.flavor == "gemma":  # transformers' Gemma conversion adds every non-normal piece
            for index, piece in non_normal_pieces(self._proto):
                self.added_tokens.setdefault(piece, index)
        wanted = [t for t in self.special_tokens.values() if t] + self.extra_special_tokens
        next_id = max([self.sp.get_piece_size() - 1, *self.added_tokens.values()]) + 1
        for text in wanted:
            if text in self.added_tokens:
                continue
            index = self.sp.piece_to_id(text)
            if self.sp.id_to_piece(index) != text:  # not in the sentencepiece vocabulary
                index, next_id = next_id, next_id + 1
            self.added_tokens[text] = index
        self._id_to_added = {v: k for k, v in self.added_tokens.items()}
        self._special = set(wanted)
        pattern = "|".join(re.escape(t) for t in sorted(self.added_tokens, key=len, reverse=True))
        self._splitter = re.compile(f"({pattern})") if pattern else None

    @property
    def vocab_size(self) -> int:
        """Size of the sentencepiece vocabulary (transformers' ``vocab_size``)."""
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        """Vocabulary size including added tokens outside the sentencepiece model."""
        return max(self.vocab_size, max(self.added_tokens.values(), default=-1) + 1)

    def token_to_id(self, token: str) -> int:
        """Id of a token text (added tokens first, then sentencepiece pieces)."""
        return self.added_tokens[token] if token in self.added_tokens else self.sp.piece_to_id(token)

    def _named_id(self, name: str) -> int | None:
        token = self.special_tokens[name]
        return None if token is None else self.token_to_id(token)

    @property
    def pad_token_id(self) -> int:
        return self._named_id("pad_token")  # type: ignore[return-value]

    @property
    def eos_token_id(self) -> int:
        return self._named_id("eos_token")  # type: ignore[return-value]

    @property
    def unk_token_id(self) -> int:
        return self._named_id("unk_token")  # type: ignore[return-value]

    @property
    def bos_token_id(self) -> int | None:
        return self._named_id("bos_token")

    # ------------------------------------------------------------------ encoding
    def canonicalize(self, text: str) -> str:
        """big_vision text canonicalisation of the SigLIP flavor (lower, no punctuation, one space)."""
        return canonicalize(text, lower_case=self.do_lower_case)

    def _split(self, text: str) -> list[tuple[str, bool]]:
        """Cut ``text`` around added tokens: ``(piece, is_added_token)``; empty pieces dropped."""
        parts = self._splitter.split(text) if self._splitter else [text]
        return [(p, i % 2 == 1) for i, p in enumerate(parts) if p]

    def _encode_plain(self, text: str) -> list[str]:
        """Sentencepiece pieces of text that holds no added token."""
        if self.flavor == "gemma":
            lowered = "".join(c.lower() for c in text) if self.do_lower_case else text  # per character
            return self.sp.encode(lowered, out_type=str)
        unk = self.special_tokens["unk_token"]
        # encode behind the unk text and drop its pieces, so the first word is cut as mid-text
        pieces = self.sp.encode(unk + self.canonicalize(text), out_type=str)
        skip = len(self.sp.encode(unk, out_type=str))
        return pieces[skip:] if len(pieces) >= skip else pieces

    def tokenize(self, text: str) -> list[str]:
        """Token strings of ``text`` without eos/padding."""
        if self.flavor == "siglip":
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        tokens: list[str] = []
        for piece, is_added in self._split(text):
            tokens.extend([piece] if is_added else self._encode_plain(piece))
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self._special:
            tokens = tokens[1:]
        return tokens

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Ids of one text with bos/eos as configured, truncated to ``max_length``, unpadded."""
        limit = self.max_length if max_length is None else int(max_length)
        ids = [self.token_to_id(t) for t in self.tokenize(text)]
        room = limit - int(self.add_bos_token) - int(self.add_eos_token)
        if len(ids) > room:
            ids = ids[:room] if self.truncation_side == "right" else ids[len(ids) - room :]
        if self.add_bos_token:
            ids = [self.bos_token_id, *ids]  # type: ignore[list-item]
        # transformers' SiglipTokenizer does not repeat an eos the text already ends with
        if self.add_eos_token and not (self.flavor == "siglip" and ids and ids[-1] == self.eos_token_id):
            ids.append(self.eos_token_id)
        return ids

    def num_tokens(self, text: str) -> int:
        """Length of ``text``'s ids with bos/eos before any truncation (compare with ``max_length``)."""
        return len(self.encode(text, max_length=1 << 30))

    def is_truncated(self, text: str, max_length: int | None = None) -> bool:
        """Would ``text`` be cut to fit ``max_length`` (default: this tokenizer's)?"""
        return self.num_tokens(text) > (self.max_length if max_length is None else int(max_length))

    def batch_encode(
        self, texts: str | Iterable[str], max_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``(B, max_length)``, padded on ``padding_side``."""
        limit = self.max_length if max_length is None else int(max_length)
        batch = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.full((len(batch), limit), self.pad_token_id, dtype=torch.long)  # (B, L)
        mask = torch.zeros((len(batch), limit), dtype=torch.long)  # (B, L)
        for row, text in enumerate(batch):
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, item {row} is {type(text).__name__}")
            encoded = torch.tensor(self.encode(text, limit), dtype=torch.long)
            span = (
                slice(0, len(encoded)) if self.padding_side == "right" else slice(limit - len(encoded), limit)
            )
            ids[row, span] = encoded
            mask[row, span] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def __call__(self, texts: str | Iterable[str], max_length: int | None = None) -> torch.Tensor:
        """``input_ids`` ``(B, max_length)`` for one text or a list of texts."""
        return self.batch_encode(texts, max_length)["input_ids"]

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of one id sequence; special tokens (padding included) dropped by default."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        words: list[str] = []
        run: list[int] = []
        for index in ids:
            token = self._id_to_added.get(index)
            if token is None:
                run.append(index)
                continue
            if token in self._special and skip_special_tokens:
                continue
            words.extend([self.sp.decode(run), token])
            run = []
        words.append(self.sp.decode(run))
        return " ".join(w for w in words if w).strip()

    def batch_decode(
        self, ids: torch.Tensor | Iterable[Iterable[int]], skip_special_tokens: bool = True
    ) -> list[str]:
        """``decode`` for each row."""
        return [self.decode(row, skip_special_tokens) for row in ids]

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (e.g. for DataLoader workers): the sentencepiece processor is rebuilt on load."""
        return {k: v for k, v in self.__dict__.items() if k != "sp"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.sp = _load_sentencepiece(self._proto, legacy=self.legacy, flavor=self.flavor)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(flavor={self.flavor!r}, vocab_size={self.vocab_size}, max_length={self.max_length}, "
            f"do_lower_case={self.do_lower_case}, model_file={str(self.model_file)!r})"
        )

    # ------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(
        cls,
        src: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        **overrides: Any,
    ) -> Tokenizer:
        """Load a transformers Siglip/SigLIP 2 tokenizer folder, a hub repo id, or a ``.model`` file."""
        path = resolve(src, revision=revision, cache_dir=cache_dir)
        if path.is_file():  # a bare model file: Gemma's is named tokenizer.model
            flavor = "gemma" if path.name == _FLAVORS["gemma"]["file"] else "siglip"
            return cls(path, **{"flavor": flavor, **overrides})
        return cls(**{**_read_folder(path), **overrides})

    def to_config(self) -> dict[str, Any]:
        """``tokenizer_config.json`` content that transformers' tokenizer classes load."""
        decoder = {
            str(index): {
                "content": text,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": text in self._special,
            }
            for text, index in sorted(self.added_tokens.items(), key=lambda item: item[1])
        }
        config: dict[str, Any] = {
            "added_tokens_decoder": decoder,
            "tokenizer_class": self._transformers_class(),
            "model_max_length": self.max_length,
            "do_lower_case": self.do_lower_case,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "extra_special_tokens": self.extra_special_tokens,
            **{k: v for k, v in self.special_tokens.items() if v is not None},
        }
        if self.flavor == "gemma":
            config.update(add_bos_token=self.add_bos_token, add_eos_token=self.add_eos_token)
        if not self.legacy:
            config["legacy"] = False
        return config

    def _transformers_class(self) -> str:
        """transformers class that reproduces these ids (Gemma without lower-casing: GemmaTokenizer)."""
        if self.flavor == "gemma" and not self.do_lower_case:
            return "GemmaTokenizer"
        return _FLAVORS[self.flavor]["tokenizer_class"]

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the sentencepiece model, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
        if self.flavor == "siglip" and not self.add_eos_token:
            raise ValueError(
                "transformers' SiglipTokenizer always appends eos; add_eos_token=False cannot be saved"
            )
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / _FLAVORS[self.flavor]["file"]).write_bytes(self._proto)
        config = self.to_config()
        special_map = {k: v for k, v in self.special_tokens.items() if v is not None}
        for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
            (folder / name).write_text(
                json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
        return folder


def canonicalize(text: str, *, lower_case: bool = True) -> str:
    """big_vision's text canonicalisation for SigLIP: lower case, ASCII punctuation removed,
    whitespace collapsed to one space."""
    if lower_case:
        text = text.lower()
    return _WHITESPACE.sub(" ", text.translate(_PUNCTUATION)).strip()


def _load_sentencepiece(proto: bytes, *, legacy: bool, flavor: str) -> spm.SentencePieceProcessor:
    """Sentencepiece processor for ``proto`` with the adjustments transformers makes."""
    if not legacy:
        proto = without_dummy_prefix(proto)
    if flavor == "gemma":  # user-defined pieces match on raw text as added tokens, not in lower-cased text
        proto = user_defined_as_normal(proto)
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto)
    return processor


def _token_text(value: Any) -> str | None:
    """A token in a transformers config: a string or a serialized ``AddedToken`` dict."""
    return value.get("content") if isinstance(value, dict) else value


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    data = read_json(file)
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got a {type(data).__name__}")
    return data


def _read_folder(folder: Path) -> dict[str, Any]:
    """``Tokenizer`` arguments from a transformers tokenizer folder."""
    config = {
        **_read_json(folder / "special_tokens_map.json"),
        **_read_json(folder / "tokenizer_config.json"),
    }
    kind = config.get("tokenizer_class")
    files = [f for f in ("spiece.model", "tokenizer.model") if (folder / f).is_file()]
    if kind is not None and kind not in _CLASS_TO_FLAVOR:
        raise ValueError(
            f"{folder}: tokenizer_class {kind!r} is not supported; known: {sorted(_CLASS_TO_FLAVOR)}"
        )
    if not files:
        raise FileNotFoundError(f"no spiece.model or tokenizer.model (sentencepiece) in {str(folder)!r}")
    flavor = _CLASS_TO_FLAVOR[kind] if kind else ("siglip" if files[0] == "spiece.model" else "gemma")
    wanted = _FLAVORS[flavor]["file"]
    model_file = folder / (wanted if wanted in files else files[0])
    args: dict[str, Any] = {"model_file": model_file, "flavor": flavor}
    max_length = config.get("model_max_length")
    if isinstance(max_length, int) and 1 < max_length < 100_000:  # transformers writes 1e30 for "unset"
        args["max_length"] = max_length
    for key in (
        "do_lower_case",
        "add_bos_token",
        "add_eos_token",
        "padding_side",
        "truncation_side",
        "legacy",
    ):
        if config.get(key) is not None:
            args[key] = config[key]
    for key in ("eos_token", "pad_token", "unk_token", "bos_token"):
        if key in config:
            args[key] = _token_text(config[key])
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    args["extra_special_tokens"] = [
        _token_text(t) for t in (extra.values() if isinstance(extra, dict) else extra)
    ]
    added = {int(k): _token_text(v) for k, v in (config.get("added_tokens_decoder") or {}).items()}
    for entry in _read_json(folder / "tokenizer.json").get("added_tokens", []):
        added.setdefault(int(entry["id"]), entry["content"])
    args["added_tokens"] = added
    return args
