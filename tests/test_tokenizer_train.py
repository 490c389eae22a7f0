"""`vision-tower train-tokenizer`: a SigLIP-layout tokenizer from shards or a caption file, and the
length report it prints (checked against transformers' SiglipTokenizer on the folder it writes)."""

from __future__ import annotations

import math
import shutil
import subprocess

import pytest

from training.demo import caption_corpus
from training.demo.shapes import make_shapes
from training.tokenizer_train import length_report, train_tokenizer
from vision_tower import Tokenizer
from vision_tower.cli import main

transformers = pytest.importorskip("transformers")
pytest.importorskip("google.protobuf")  # transformers' SiglipTokenizer needs protobuf


def hf_lengths(folder, captions: list[str]) -> list[int]:
    """Token counts (</s> included, untruncated) by transformers' own tokenizer."""
    hf = transformers.SiglipTokenizer.from_pretrained(folder)
    return [len(hf(c, truncation=False)["input_ids"]) for c in captions]


def nearest_rank(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[math.ceil(q * len(ordered)) - 1]


def test_from_shards_prints_fit_percentiles_and_suggestion(tmp_path):
    shapes = make_shapes(
        tmp_path / "shapes", n_train=60, n_val=4, shard_size=25, image_size=16, zeroshot_per_class=1
    )
    out = tmp_path / "tok"
    exe = shutil.which("vision-tower")
    assert exe, "the vision-tower console script is not installed (pip install -e .)"
    proc = subprocess.run(
        [
            exe,
            "train-tokenizer",
            "--shards",
            shapes.train,
            "--out",
            str(out),
            "--vocab-size",
            "128",
            "--max-length",
            "7",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    captions = [
        line for s in sorted((tmp_path / "shapes" / "train").glob("*.tar")) for line in _tar_captions(s)
    ]
    assert len(captions) == 60
    lengths = hf_lengths(out, captions)
    fit = sum(n <= 7 for n in lengths) / 60
    assert 0 < fit < 1  # some captions are longer than 7 tokens: a case the report can get wrong
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("trained a bpe tokenizer on 60 captions from ") and "128 pieces" in lines[0]
    assert lines[1] == f"{fit:.2%} of the 60 captions fit in max_length 7"
    p = {q: nearest_rank(lengths, q / 100) for q in (50, 90, 99)}
    assert lines[2] == (
        f"token lengths (with </s>): median {p[50]}, p90 {p[90]}, p99 {p[99]}, longest {max(lengths)}"
    )
    assert lines[3] == f"suggested max_length (fits 99%): {p[99]}"
    assert Tokenizer.from_pretrained(out).max_length == 7


def _tar_captions(path) -> list[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]


def test_from_a_caption_file_and_ids_equal_transformers(tmp_path, capsys):
    captions = caption_corpus()[:300] + ["A Very, VERY long caption: " + "with many words " * 6]
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n\n")
    out = tmp_path / "tok"
    assert (
        main(
            [
                "train-tokenizer",
                "--captions",
                str(tmp_path / "captions.txt"),
                "--out",
                str(out),
                "--max-length",
                "12",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    lengths = hf_lengths(out, captions)
    assert f"{sum(n <= 12 for n in lengths) / len(captions):.2%} of the {len(captions)} captions" in printed
    assert f"longest {max(lengths)}" in printed and max(lengths) > 12
    ours = Tokenizer.from_pretrained(out)
    hf = transformers.SiglipTokenizer.from_pretrained(out)
    want = hf(captions, padding="max_length", truncation=True, max_length=12, return_tensors="pt")[
        "input_ids"
    ]
    assert ours(captions).tolist() == want.tolist()
    assert [ours.num_tokens(c) for c in captions] == lengths
    # asked for 32000 pieces, the captions support far fewer: the report says so
    assert f"{ours.vocab_size} pieces (asked 32000" in printed


def test_the_demo_tokenizer_fits_every_caption_and_prompt(tmp_path):
    tok = train_tokenizer(caption_corpus(), tmp_path, vocab_size=128, max_length=16)
    report = length_report(tok, caption_corpus())
    assert tok.vocab_size == 128 and report.fit_share == 1.0 and report.longest <= 16
    # the unigram model on the same captions stops at a fraction of the pieces and cuts captions
    unigram = train_tokenizer(
        caption_corpus(), tmp_path / "u", vocab_size=128, max_length=16, model_type="unigram"
    )
    assert unigram.vocab_size < 128 and length_report(unigram, caption_corpus()).fit_share < 1


class WordTokenizer:
    """One token per word plus </s>."""

    max_length = 60

    @staticmethod
    def num_tokens(text: str) -> int:
        return len(text.split()) + 1


def test_length_report_by_hand():
    texts = [" ".join(["w"] * n) for n in range(100, 0, -1)]  # 2 .. 101 tokens, once each
    report = length_report(WordTokenizer(), texts)
    # nearest rank: the 50th, 90th and 99th smallest of 2..101 are 51, 91 and 100; 59 of 100 fit in 60
    assert report.percentiles == {50: 51, 90: 91, 99: 100} and report.longest == 101
    assert report.fit_share == 0.59 and report.suggested_max_length == 100 and report.n == 100


def test_errors(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert (
        main(["train-tokenizer", "--captions", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "t")])
        == 2
    )
    assert capsys.readouterr().err.strip() == (
        f"vision-tower train-tokenizer: error: {tmp_path / 'empty.txt'} holds no captions (one per line "
        "expected)"
    )
    assert (
        main(["train-tokenizer", "--captions", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "busy")])
        == 2
    )
    assert "is a folder that is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["train-tokenizer", "--captions", "a", "--shards", "b", "--out", str(tmp_path / "t")])
    assert stop.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_the_demo_decoder_tokenizer_has_gemma_layout_and_whole_caption_words(tmp_path):
    import json

    from transformers import AutoTokenizer

    from training.tokenizer_train import train_decoder_tokenizer

    train_decoder_tokenizer(caption_corpus(), tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")  # a transformers folder, as train-vlm reads it
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["tokenizer_class"].startswith(
        "Gemma"
    )
    assert [tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<unk>"]) == [0, 1, 2, 3]
    (newline,) = tok("\n", add_special_tokens=False)["input_ids"]  # PaliGemma's prompt ends with one
    assert newline != tok.unk_token_id
    for text in ("a photo of a medium purple triangle", "there is a cyan star in the picture"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text.split()) and tok.unk_token_id not in ids  # one piece per word
        assert tok.decode(ids) == text
