"""transformers' Idefics3 / SmolVLM and Gemma 3 processors built locally from word-level tokenizers holding
their special tokens (nothing downloaded), for the ``split`` and ``pan_and_scan`` parity tests."""

from __future__ import annotations

from typing import Any
from unittest import mock

from transformers import PreTrainedTokenizerFast

from training.demo.decoders import word_tokenizer

IDEFICS3_IMAGE = "<image>"
IDEFICS3_TOKENS = [
    "<fake_token_around_image>",
    IDEFICS3_IMAGE,
    "<global-img>",
    "<end_of_utterance>",
    "\n",  # a token of its own, so that the ids show every newline of the prompt
    *(f"<row_{r}_col_{c}>" for r in range(1, 9) for c in range(1, 9)),
]
GEMMA3_BOI, GEMMA3_EOI, GEMMA3_IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
GEMMA3_WORDS = "Here is the original image and here are some crops to help you see better"


def idefics3_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Idefics3's special tokens, the rows and columns up to 8 x 8 and ``\\n``."""
    return word_tokenizer(["hi"], extra_tokens=IDEFICS3_TOKENS)


def gemma3_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Gemma 3's ``boi_token`` / ``eoi_token`` / ``image_token`` (as
    ``GemmaTokenizer`` names them), the words of the pan-and-scan prompt and ``\\n``."""
    words = word_tokenizer([GEMMA3_WORDS], extra_tokens=[GEMMA3_BOI, GEMMA3_EOI, GEMMA3_IMAGE, "\n"])
    return PreTrainedTokenizerFast(
        tokenizer_object=words.backend_tokenizer,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        extra_special_tokens={"boi_token": GEMMA3_BOI, "eoi_token": GEMMA3_EOI, "image_token": GEMMA3_IMAGE},
    )


def _image_processor(cls_name: str, backend: str, **kwargs: Any) -> Any:
    import transformers

    return getattr(transformers, cls_name + ("Pil" if backend == "pil" else ""))(
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], **kwargs
    )


def idefics3_processor(
    backend: str,
    tile: int,
    image_seq_len: int,
    *,
    longest_edge: int,
    do_image_splitting: bool = True,
    smolvlm: bool = False,
) -> Any:
    """``Idefics3Processor`` (``smolvlm``: ``SmolVLMProcessor``) with ``backend``'s image processor
    (``Idefics3ImageProcessor`` / ``SmolVLMImageProcessor``, their ``*Pil`` classes for "pil"), its default
    filter (Lanczos), ``size={"longest_edge": longest_edge}`` and ``max_image_size`` the tile."""
    import transformers

    family = "SmolVLM" if smolvlm else "Idefics3"
    image_processor = _image_processor(
        f"{family}ImageProcessor",
        backend,
        size={"longest_edge": longest_edge},
        max_image_size={"longest_edge": tile},
        do_image_splitting=do_image_splitting,
    )
    if not smolvlm:
        return transformers.Idefics3Processor(
            image_processor, idefics3_tokenizer(), image_seq_len=image_seq_len
        )
    from transformers.models.smolvlm import processing_smolvlm

    # num2words (not installed here) only spells out video frame counts; images never reach it
    with mock.patch.object(processing_smolvlm, "num2words", processing_smolvlm.num2words or str):
        return transformers.SmolVLMProcessor(
            image_processor,
            idefics3_tokenizer(),
            transformers.SmolVLMVideoProcessor(),
            image_seq_len=image_seq_len,
        )


def gemma3_processor(backend: str, tile: int, image_seq_length: int) -> Any:
    """``Gemma3Processor`` with ``backend``'s ``Gemma3ImageProcessor`` (its default bilinear filter) for
    ``tile`` px crops; pan and scan is asked for at call time (``do_pan_and_scan=True`` and its options)."""
    import transformers

    image_processor = _image_processor("Gemma3ImageProcessor", backend, size={"height": tile, "width": tile})
    return transformers.Gemma3Processor(
        image_processor, gemma3_tokenizer(), image_seq_length=image_seq_length
    )


def expanded_text(processor: Any, image: Any, marker: str, **kwargs: Any) -> str:
    """The text ``processor`` puts in place of ``marker`` for ``image``: the steps of its ``__call__``
    before tokenizing (``prepare_inputs_layout``, ``_process_images``, ``get_text_with_replacements``)."""
    images, text, *_ = processor.prepare_inputs_layout(images=image, text=marker, **kwargs)
    merged = processor._merge_kwargs(tokenizer_init_kwargs=processor.tokenizer.init_kwargs, **kwargs)
    _, replacements = processor._process_images(images, **merged["images_kwargs"])
    texts, _ = processor.get_text_with_replacements(text, images_replacements=replacements)
    return texts[0]
