"""The demo's word-level tokenizer for closed caption vocabularies, and a preset decoder saved with it as
a folder: what tests and the README's Python example train without downloading a language model. The
decoder presets themselves live in :mod:`connectors.decoder_presets`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from transformers import PreTrainedModel

from connectors.decoder_presets import build_decoder

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")


def word_tokenizer(texts: Iterable[str], *, extra_tokens: Iterable[str] = ("<image>",)) -> Any:
    """A word-level transformers tokenizer (one token per whitespace-separated word of ``texts``, in
    order of first appearance) with ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>`` and ``extra_tokens`` as
    special tokens; encoding with special tokens prepends ``<bos>``, decoding joins words with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for text in texts:
        for word in text.split():
            vocab.setdefault(word, len(vocab))
    extra = [t for t in extra_tokens if t not in vocab]
    for token in extra:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=extra,
    )


def save_decoder(out_dir: str | os.PathLike, name: str, tokenizer: Any, **overrides: Any) -> PreTrainedModel:
    """Build preset ``name`` for ``tokenizer`` and save both in ``out_dir`` (a folder ``model.decoder``
    and ``AutoModelForCausalLM`` read)."""
    model = build_decoder(name, tokenizer, **overrides)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model
