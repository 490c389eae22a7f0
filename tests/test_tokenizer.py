"""Tokenizer parity with transformers' SiglipTokenizer / Siglip2Tokenizer on sentencepiece models trained
here."""

from __future__ import annotations

import io
import json
import pickle
import random
import warnings
from pathlib import Path

import pytest
import torch

from vision_tower.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("google.protobuf")  # transformers' SiglipTokenizer needs protobuf

spm = pytest.importorskip("sentencepiece")

VOCABULARY = (
    "a photo of the cat dog bird car tree house person man woman child playing sitting running "
    "on in under over with and two three red green blue small large old new beautiful street park "
    "beach mountain city night day sky water river food plate table chair window door picture "
    "café crème brûlée naïve façade déjà vu über straße ein foto von einer katze 東京 夜景 写真 "
    "hello world quick brown fox jumps lazy 2024 3d 42"
)

TEXTS = [
    "A photo of a cat.",
    "A PHOTO OF A CAT!!!",
    "Hello, World! How are you doing today?",
    "",
    " ",
    "   leading and trailing spaces   ",
    "many     spaces\t\ttabs\nand\r\nnewlines",
    "punctuation: (parens) [brackets] {braces} <angle> 'quotes' \"double\" - _ / \\ | ~ ` @ # $ % ^ & * + =",
    "Ünïcode ÇAFÉ crème brûlée — déjà vu… «quotes» “curly” ’apostrophe’",
    "ΣΑΣ Greek capitals ΟΔΟΣ and İstanbul",
    "東京の夜景の写真 and mixed script",
    "emoji 😀 🐱 🚗 not in the vocabulary",
    "digits 0123456789 and 3.14159 and 1,000,000",
    "▁literal▁underscores ▁ between",
    "hi </s> there",
    "hi</s>",
    "</s>",
    "</s></s> double",
    "<unk> unknown token text",
    "</S> upper-case special is plain text",
    "word " * 100,
    "x" * 400,
    "a photo of " + "very " * 70 + "long caption",
]


def _corpus(seed: int = 0, lines: int = 400) -> list[str]:
    rng = random.Random(seed)
    words = VOCABULARY.split()
    out = []
    for _ in range(lines):
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        if rng.random() < 0.5:
            sentence = sentence.capitalize() + rng.choice([".", "!", "?", ","])
        out.append(sentence)
    return out


def _train(folder: Path, name: str, **options) -> Path:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
        **options,
    )
    path = folder / name
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def siglip_model(tmp_path_factory) -> Path:
    """T5-style unigram model like SigLIP's: <pad>=0, </s>=1, <unk>=2, no bos."""
    folder = tmp_path_factory.mktemp("siglip_spm")
    return _train(
        folder, "spiece.model", vocab_size=300, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1
    )


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory) -> Path:
    """Gemma-style BPE model (byte fallback, no dummy prefix) laid out like a SigLIP 2 checkpoint."""
    folder = tmp_path_factory.mktemp("gemma_spm")
    _train(
        folder,
        "tokenizer.model",
        vocab_size=400,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<mask>", "<start_of_image>"],
        byte_fallback=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        split_by_whitespace=False,
        allow_whitespace_only_pieces=True,
    )
    config = {
        # what SigLIP 2 repos ship; AutoTokenizer maps them to Siglip2Tokenizer
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": False,
        "add_eos_token": True,
        "padding_side": "right",
        "model_max_length": 64,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def reference(siglip_model):
    return transformers.SiglipTokenizer(str(siglip_model))


def _ref_ids(tokenizer, texts, max_length=64) -> torch.Tensor:
    with warnings.catch_warnings():  # "This sequence already has </s>"
        warnings.simplefilter("ignore")
        out = tokenizer(
            texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
    return out["input_ids"]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_siglip_ids_equal_transformers(siglip_model, reference, text):
    ours = Tokenizer(siglip_model)(text)
    assert ours.dtype == torch.long and ours.shape == (1, 64)
    torch.testing.assert_close(ours, _ref_ids(reference, [text]), rtol=0, atol=0)


def test_siglip_batch_and_short_max_length(siglip_model, reference):
    tok = Tokenizer(siglip_model)
    torch.testing.assert_close(tok(TEXTS), _ref_ids(reference, TEXTS), rtol=0, atol=0)
    torch.testing.assert_close(tok(TEXTS, max_length=8), _ref_ids(reference, TEXTS, 8), rtol=0, atol=0)


def test_siglip_special_ids_and_layout(siglip_model, reference):
    tok = Tokenizer(siglip_model)
    assert (tok.vocab_size, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (
        reference.vocab_size,
        reference.pad_token_id,
        reference.eos_token_id,
        reference.unk_token_id,
    )
    assert tok.bos_token_id is None
    short, long = tok(["a cat", "word " * 200])
    n = len(tok.encode("a cat"))
    assert short[n - 1] == tok.eos_token_id and (short[n:] == tok.pad_token_id).all()
    assert long[-1] == tok.eos_token_id  # truncation keeps the eos
    batch = tok.batch_encode(["a cat", "word " * 200])
    assert batch["attention_mask"][0].sum() == n and batch["attention_mask"][1].all()


def test_siglip_lower_case_off(siglip_model):
    ref = transformers.SiglipTokenizer(str(siglip_model), do_lower_case=False)
    texts = ["A Photo Of A CAT", "Café ÇA"]
    torch.testing.assert_close(
        Tokenizer(siglip_model, do_lower_case=False)(texts), _ref_ids(ref, texts), rtol=0, atol=0
    )


def test_siglip_legacy_false_drops_dummy_prefix(siglip_model):
    ref = transformers.SiglipTokenizer(str(siglip_model), legacy=False)
    tok = Tokenizer(siglip_model, legacy=False)
    assert tok.sp.encode("photo", out_type=str) != Tokenizer(siglip_model).sp.encode("photo", out_type=str)
    torch.testing.assert_close(tok(TEXTS), _ref_ids(ref, TEXTS), rtol=0, atol=0)


def test_from_transformers_folder(siglip_model, reference, tmp_path):
    reference.save_pretrained(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.flavor == "siglip" and tok.max_length == 64
    torch.testing.assert_close(tok(TEXTS), _ref_ids(reference, TEXTS), rtol=0, atol=0)


def test_from_hub_style_folder(siglip_model, reference, tmp_path):
    """The layout of google/siglip-* repos: AddedToken dicts, lstrip/rstrip true, special_tokens_map.json."""
    (tmp_path / "spiece.model").write_bytes(siglip_model.read_bytes())
    token = {"lstrip": True, "normalized": False, "rstrip": True, "single_word": False, "special": True}
    config = {
        "added_tokens_decoder": {"1": {"content": "</s>", **token}, "2": {"content": "<unk>", **token}},
        "additional_special_tokens": [],
        "do_lower_case": True,
        "model_input_names": ["input_ids"],
        "model_max_length": 64,
        "processor_class": "SiglipProcessor",
        "sp_model_kwargs": {},
        "tokenizer_class": "SiglipTokenizer",
    }
    special = {"eos_token": {"content": "</s>", **token}, "pad_token": "</s>", "unk_token": "<unk>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    torch.testing.assert_close(
        Tokenizer.from_pretrained(tmp_path)(TEXTS), _ref_ids(ref, TEXTS), rtol=0, atol=0
    )


@pytest.mark.parametrize("legacy", [True, False])
def test_save_pretrained_loads_in_transformers(siglip_model, reference, tmp_path, legacy):
    tok = Tokenizer(siglip_model, max_length=32, legacy=legacy)
    tok.save_pretrained(tmp_path)
    expected = _ref_ids(transformers.SiglipTokenizer(str(siglip_model), legacy=legacy), TEXTS, 32)
    for loaded in (
        transformers.SiglipTokenizer.from_pretrained(tmp_path),
        transformers.AutoTokenizer.from_pretrained(tmp_path),
    ):
        assert loaded.model_max_length == 32
        torch.testing.assert_close(_ref_ids(loaded, TEXTS, 32), expected, rtol=0, atol=0)
    again = Tokenizer.from_pretrained(tmp_path)
    torch.testing.assert_close(again(TEXTS), expected, rtol=0, atol=0)
    assert again.max_length == 32 and again.legacy == legacy


def test_decode(siglip_model, reference):
    tok = Tokenizer(siglip_model)
    ids = tok("A photo of a cat, sitting!")[0]
    assert tok.decode(ids) == "a photo of a cat sitting"
    assert tok.decode(ids) == reference.decode(ids.tolist(), skip_special_tokens=True)
    assert tok.batch_decode(tok(["a dog", "the park"])) == ["a dog", "the park"]
    assert tok.decode(ids, skip_special_tokens=False).startswith("a photo of a cat sitting </s>")


def test_pickle_and_bare_model_file(siglip_model, gemma_folder):
    tok = Tokenizer.from_pretrained(siglip_model)
    again = pickle.loads(pickle.dumps(tok))
    torch.testing.assert_close(again(TEXTS), tok(TEXTS), rtol=0, atol=0)
    assert Tokenizer.from_pretrained(gemma_folder / "tokenizer.model").flavor == "gemma"


def test_hub_repo_id_from_offline_cache(siglip_model, reference, tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "models--org--tiny-siglip" / "snapshots" / ("0" * 40)
    reference.save_pretrained(snapshot)
    (tmp_path / "models--org--tiny-siglip" / "refs").mkdir()
    (tmp_path / "models--org--tiny-siglip" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    tok = Tokenizer.from_pretrained("org/tiny-siglip", cache_dir=tmp_path)
    torch.testing.assert_close(tok(TEXTS[:5]), _ref_ids(reference, TEXTS[:5]), rtol=0, atol=0)


def test_errors(siglip_model, tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer flavor 'bert'"):
        Tokenizer(siglip_model, flavor="bert")
    with pytest.raises(ValueError, match="max_length must be at least 2"):
        Tokenizer(siglip_model, max_length=1)
    with pytest.raises(FileNotFoundError, match="no spiece.model or tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "spiece.model").write_bytes(siglip_model.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    with pytest.raises(ValueError, match="tokenizer_class 'BertTokenizer' is not supported"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="item 1 is int"):
        Tokenizer(siglip_model)(["ok", 3])


# ---------------------------------------------------------------------------- SigLIP 2 (Gemma)
GEMMA_TEXTS = [
    *TEXTS,
    "a <eos> in the middle",
    "x<start_of_image>y user-defined piece",
    "<START> <Eos> upper-case lookalikes are plain text",
    "<MASK> and <Start_Of_Image> become user-defined pieces only after lower-casing",
    "text that ends with <eos>",
    "double  space and trailing space ",
]


@pytest.fixture(scope="module")
def siglip2_reference(gemma_folder):
    return transformers.Siglip2Tokenizer.from_pretrained(gemma_folder)


def test_gemma_ids_equal_siglip2_tokenizer(gemma_folder, siglip2_reference):
    tok = Tokenizer.from_pretrained(gemma_folder)
    assert tok.flavor == "gemma" and tok.do_lower_case
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    for max_length in (64, 8):
        expected = _ref_ids(siglip2_reference, GEMMA_TEXTS, max_length)
        torch.testing.assert_close(tok(GEMMA_TEXTS, max_length=max_length), expected, rtol=0, atol=0)


def test_gemma_save_pretrained_loads_in_transformers(gemma_folder, siglip2_reference, tmp_path):
    Tokenizer.from_pretrained(gemma_folder).save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.model").is_file()
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "Siglip2Tokenizer"
    expected = _ref_ids(siglip2_reference, GEMMA_TEXTS)
    torch.testing.assert_close(_ref_ids(loaded, GEMMA_TEXTS), expected, rtol=0, atol=0)
    torch.testing.assert_close(Tokenizer.from_pretrained(tmp_path)(GEMMA_TEXTS), expected, rtol=0, atol=0)


def test_gemma_without_lower_case_equals_gemma_tokenizer(gemma_folder, tmp_path):
    tok = Tokenizer.from_pretrained(gemma_folder, do_lower_case=False)
    expected = _ref_ids(transformers.GemmaTokenizer.from_pretrained(gemma_folder), GEMMA_TEXTS)
    torch.testing.assert_close(tok(GEMMA_TEXTS), expected, rtol=0, atol=0)
    tok.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    torch.testing.assert_close(_ref_ids(loaded, GEMMA_TEXTS), expected, rtol=0, atol=0)
