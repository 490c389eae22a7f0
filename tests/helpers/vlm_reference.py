"""Tiny random towers, decoders (gemma, gemma2, qwen2, qwen3, llama, gemma3_text) and tokenizers for the VLM
tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from connectors.decoder_presets import DECODER_PRESETS
from tests.helpers.hf_reference import randomize_, tiny_encoder
from vision_tower import VisionConfig, VisionTower

FAMILIES = (
    "gemma",
    "gemma2",
    "qwen2",
    "qwen3",
    "llama",
    "gemma3_text",
)  # appended: the fixtures keep their seeds
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "cat",
    "dog",
    "caption",
    "en",
    "what",
    "is",
    "this",
    "USER:",
    "ASSISTANT:",
]
VOCAB = 256  # tokenizer size; decoders get a few spare rows


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of 256 entries that prepends <bos>."""
    words = SPECIALS + WORDS + [f"w{i}" for i in range(VOCAB - len(SPECIALS) - len(WORDS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def decoder_config(family: str, **overrides):
    from transformers import AutoConfig

    _, tiny = DECODER_PRESETS["tiny_gemma"]  # the shape of the decoder preset the tests train
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # those of tokenizer()
    base = {**tiny, "vocab_size": VOCAB + 4, "max_position_embeddings": 256, **ids}
    extra = {
        "gemma2": dict(
            sliding_window=8,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            query_pre_attn_scalar=16,
        ),
        # 4 layers, sliding and global in turn (Gemma 3's pattern is 5:1), a window the prompts exceed, the
        # local layers' own rope base; no final soft-capping, as the released Gemma 3 models
        "gemma3_text": dict(
            num_hidden_layers=4,
            sliding_window=8,
            sliding_window_pattern=2,
            query_pre_attn_scalar=16,
            rope_local_base_freq=100.0,
        ),
        "qwen2": dict(tie_word_embeddings=False),
        "llama": dict(tie_word_embeddings=False),
    }.get(family, {})
    return AutoConfig.for_model(family, **{**base, **extra, **overrides})


def decoder(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(decoder_config(family, **overrides))
    return randomize_(model.eval(), seed, scale=0.2)


def decoder_folder(family: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """A random decoder and the tokenizer, saved as transformers does."""
    decoder(family, seed, **overrides).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


# The VLM tests' tower: 32 px images in 8 px patches (4x4 tokens), width 32, 2 blocks, no head.
TOWER = tiny_encoder(32, 64, image_size=32, patch_size=8)


def hf_tower_config(**overrides) -> dict:
    """:data:`TOWER` as transformers' ``SiglipVisionConfig`` fields, for a VLM config built in a test."""
    return {**TOWER, "vision_use_head": False, **overrides}


def hf_paligemma(text_config: dict, *, image_token_index: int, projection_dim: int, seed: int = 0, **vision):
    """A random transformers ``PaliGemmaForConditionalGeneration``: the tower of :func:`hf_tower_config`
    (``vision``: its overrides) before the decoder of ``text_config``."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    cfg = PaliGemmaConfig(
        vision_config=hf_tower_config(**vision),
        text_config=text_config,
        image_token_index=image_token_index,
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    return randomize_(PaliGemmaForConditionalGeneration(cfg).eval(), seed)


def tower(seed: int = 0, **overrides) -> VisionTower:
    """A random tower of :data:`TOWER`'s shape."""
    torch.manual_seed(seed)
    t = VisionTower(VisionConfig(**{**TOWER, "use_head": False, **overrides}))
    return randomize_(t.eval(), seed)


def pixels(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def prompt_batch(image_token_id: int, num_image_tokens: int, prefix=(5, 6, 7), suffix=(8, 9, 10, 11)):
    """input_ids, attention_mask, token_type_ids, labels for two rows: image, bos, prefix text, suffix."""
    rows, types = [], []
    for shift in (0, 3):
        p = [t + shift for t in prefix]
        s = [t + shift for t in suffix]
        rows.append([image_token_id] * num_image_tokens + [1] + p + s)
        types.append([0] * (num_image_tokens + 1 + len(p)) + [1] * len(s))
    ids = torch.tensor(rows)
    return ids, torch.ones_like(ids), torch.tensor(types), ids.clone()


def decoder_logits_with_images(vlm, batch, image_tokens: torch.Tensor) -> torch.Tensor:
    """(B, L, V) the VLM's decoder alone on ``batch`` (``input_ids``, ``attention_mask``; left-padded) with
    the placeholders' embeddings replaced by ``image_tokens`` (E, D), in order: the reference that the VLM's
    own packing of image tokens into its prompt is checked against."""
    ids = batch.input_ids
    is_image = ids == vlm.image_token_id
    embeds = vlm.decoder.get_input_embeddings()(ids.masked_fill(is_image, 0))
    embeds[is_image] = image_tokens
    with torch.no_grad():
        position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
        return vlm.decoder(
            inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=position_ids
        ).logits


def assert_same_logits_and_greedy_tokens(hf, ours, inputs: dict, pixels, sizes, *, prompts=None, tokens=6):
    """On a processor's ``inputs`` (left-padded ids and mask; ``pixels`` and ``sizes`` as ours reads
    them), transformers' logits at the attended positions equal ours (1e-4), and its greedy ``tokens``
    (our placeholder suppressed on its side) equal what ours generates: from ``prompts`` when given (ours
    builds the ids), else from the same ids. Returns our logits."""
    from torch.testing import assert_close

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        theirs = hf(**inputs, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        mine = ours(ids, pixels, mask, image_sizes=sizes).logits
    assert_close(mine[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=1e-4)
    hf.generation_config.eos_token_id = None
    suppress = [ours.image_token_id]  # ours never generates the placeholder
    generated = hf.generate(**inputs, max_new_tokens=tokens, do_sample=False, suppress_tokens=suppress)
    given = dict(input_ids=ids, attention_mask=mask) if prompts is None else dict(prompts=prompts)
    continued = ours.generate(pixels, **given, image_sizes=sizes, max_new_tokens=tokens, eos_token_id=[])
    assert torch.equal(generated[:, ids.shape[1] :], continued), (generated, continued)
    return mine


def our_prompt_batch(vlm, prompts: list[str], sizes, *, pad_token_id: int = 0):
    """The left-padded causal batch our ``vlm`` builds for ``prompts`` with one image of each size in
    ``sizes`` (a list of (h, w) or an (N, 2) tensor): what a transformers processor must give too."""
    from connectors.inputs import build_prompts

    sizes = sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes
    return build_prompts(
        vlm.tokenizer,
        prompts,
        image_token_id=vlm.image_token_id,
        image=[vlm.image_prompt_ids(s) for s in sizes],
        pad_token_id=pad_token_id,
        causal=True,
    )
