"""Train a small SigLIP-style sentencepiece tokenizer on captions (for from-scratch runs and the demo)."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from vision_tower import Tokenizer


def train_tokenizer(
    texts: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int = 256, max_length: int = 16
) -> Tokenizer:
    """A unigram model laid out like SigLIP's (<pad>=0, </s>=1, <unk>=2, no bos, lower-cased input),
    saved as a transformers SiglipTokenizer folder in ``out_dir``."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t.lower() for t in texts]),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spiece.model"
        path.write_bytes(model.getvalue())
        tokenizer = Tokenizer(path, max_length=max_length)
        tokenizer.save_pretrained(out_dir)
    return Tokenizer.from_pretrained(out_dir)
