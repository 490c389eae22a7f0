"""Train a SigLIP-layout sentencepiece tokenizer on captions, and measure how well it fits them.

The layout is SigLIP's (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, no bos, text lower-cased and
stripped of punctuation as `vision_tower.Tokenizer` does before encoding); the folder written is a
transformers ``SiglipTokenizer`` folder that `vision_tower.Tokenizer.from_pretrained` and
transformers both load. Used by ``vision-tower train-tokenizer`` and the demo. The demo's decoder gets
a tokenizer of its own in Gemma's layout (:func:`train_decoder_tokenizer`).
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece as spm

from vision_tower import Tokenizer
from vision_tower.tokenizer import canonicalize

from .data import ShardSpec, SkipCounter, SkipSample, expand_shards, iter_tar_samples, read_caption

MODEL_TYPES = ("bpe", "unigram")
# Fit a tokenizer on at most this many captions (sentencepiece samples them); lengths use them all.
MAX_TRAINING_SENTENCES = 2_000_000
FIT_TARGET = 0.99  # the suggested max_length fits this share of the captions


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 32000,
    max_length: int = 64,
    model_type: str = "bpe",
) -> Tokenizer:
    """Train on ``texts`` and save a transformers SiglipTokenizer folder in ``out_dir``.

    ``vocab_size`` is an upper bound: a small caption set yields fewer pieces (``tokenizer.vocab_size``
    says how many). BPE is the default because sentencepiece's unigram trainer stops far below the
    asked size on small, repetitive caption sets (51 of 128 pieces on the shapes captions, which then
    split "medium" into five pieces); SigLIP's own tokenizers are unigram models and ``"unigram"``
    gives one. Both load in transformers' SiglipTokenizer.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if vocab_size < 8:
        raise ValueError(
            f"vocab_size must be at least 8 (3 special tokens and some pieces), got {vocab_size}"
        )
    sentences = [c for c in (canonicalize(t) for t in texts) if c]
    if not sentences:
        raise ValueError("no non-empty captions to train a tokenizer on")
    model = _sentencepiece(sentences, vocab_size, model_type, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spiece.model"
        path.write_bytes(model)
        Tokenizer(path, max_length=max_length).save_pretrained(out_dir)
    return Tokenizer.from_pretrained(out_dir)


def _sentencepiece(sentences: list[str], vocab_size: int, model_type: str, **options) -> bytes:
    """A sentencepiece model (serialized) trained on ``sentences``; ``options`` set the special ids."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=0.9995,  # sentencepiece's default: very rare characters become <unk>
        hard_vocab_limit=False,
        input_sentence_size=MAX_TRAINING_SENTENCES,
        shuffle_input_sentence=True,
        minloglevel=2,
        num_threads=1,
        **options,
    )
    return model.getvalue()


# Gemma's special pieces, ids in this order: <pad> 0, <eos> 1, <bos> 2, <unk> 3
_GEMMA_SPECIALS = {
    **{f"{name}_id": i for i, name in enumerate(("pad", "eos", "bos", "unk"))},
    **{f"{name}_piece": f"<{name}>" for name in ("pad", "eos", "bos", "unk")},
}


def train_decoder_tokenizer(
    texts: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int = 256
) -> Any:
    """Train a Gemma-layout sentencepiece BPE tokenizer (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>``
    3, a newline piece for PaliGemma's prompt layout; case and punctuation kept) on ``texts`` and save it
    as a transformers ``GemmaTokenizer`` folder in ``out_dir``: the tokenizer of a decoder trained from
    scratch (``model.tokenizer`` of ``train-vlm`` with a ``preset:`` decoder). Returns the loaded
    tokenizer."""
    from transformers import AutoTokenizer, GemmaTokenizer

    sentences = [t.strip() for t in texts if t.strip()]
    if not sentences:
        raise ValueError("no non-empty captions to train a tokenizer on")
    model = _sentencepiece(
        sentences,
        vocab_size,
        "bpe",
        **_GEMMA_SPECIALS,
        user_defined_symbols=["\n"],
        add_dummy_prefix=False,  # as Gemma: no space is put before the text
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(model)
        GemmaTokenizer.from_pretrained(tmp).save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(str(out_dir))


# ----------------------------------------------------------------------------- captions


def captions_from_file(path: str | os.PathLike) -> list[str]:
    """One caption per line of a UTF-8 text file (blank lines skipped)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"caption file {file} does not exist (or is not a file)")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    captions = [line.strip() for line in lines if line.strip()]
    if not captions:
        raise ValueError(f"{file} holds no captions (one per line expected)")
    return captions


def captions_from_shards(shards: ShardSpec, *, limit: int | None = None) -> Iterator[str]:
    """The captions of WebDataset shards (``txt``, or ``caption``/``text`` in ``json``); images are
    not decoded, samples without a usable caption are passed over."""
    counter = SkipCounter(max_consecutive=1 << 62)
    seen = 0
    for url in expand_shards(shards):
        for sample in iter_tar_samples(url, counter):
            try:
                yield read_caption(sample)
            except SkipSample:
                continue
            seen += 1
            if limit is not None and seen >= limit:
                return


# ----------------------------------------------------------------------------- fit


@dataclass
class LengthReport:
    """How the token lengths of a caption set (eos included) compare with ``max_length``."""

    n: int
    max_length: int
    fit_share: float  # share of captions with at most max_length tokens
    percentiles: dict[int, int]  # 50, 90, 99 -> tokens
    longest: int
    suggested_max_length: int  # the smallest length that fits FIT_TARGET of the captions

    def lines(self) -> list[str]:
        p = self.percentiles
        return [
            f"{self.fit_share:.2%} of the {self.n} captions fit in max_length {self.max_length}",
            f"token lengths (with </s>): median {p[50]}, p90 {p[90]}, p99 {p[99]}, longest {self.longest}",
            f"suggested max_length (fits {FIT_TARGET:.0%}): {self.suggested_max_length}",
        ]


def _percentile(sorted_values: list[int], q: float) -> int:
    """The smallest value with at least a share ``q`` of the values at or below it."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def length_report(tokenizer: Tokenizer, texts: Iterable[str]) -> LengthReport:
    """Token lengths of ``texts`` under ``tokenizer`` against its ``max_length``."""
    lengths = sorted(tokenizer.num_tokens(t) for t in texts)
    if not lengths:
        raise ValueError("no captions to measure")
    fit = sum(n <= tokenizer.max_length for n in lengths) / len(lengths)
    return LengthReport(
        n=len(lengths),
        max_length=tokenizer.max_length,
        fit_share=fit,
        percentiles={q: _percentile(lengths, q / 100) for q in (50, 90, 99)},
        longest=lengths[-1],
        suggested_max_length=max(2, _percentile(lengths, FIT_TARGET)),
    )
