"""The WebDataset pipeline: bad samples skipped and counted, rank/worker splits, exact resume."""

from __future__ import annotations

import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.shards import ONE_PASS, encode, pil_decode, write_tar
from training.data import (
    ShardLoader,
    TokenizeOne,
    batches_before,
    build_dataset,
    expand_shards,
)
from training.demo.shapes import make_sample

L = 24  # token length of the test text transform


def image_tf(image: Image.Image) -> torch.Tensor:
    """PIL -> (3, 8, 8) in [0, 1]."""
    small = image.convert("RGB").resize((8, 8), Image.NEAREST)
    return torch.from_numpy(np.asarray(small, dtype=np.float32)).permute(2, 0, 1) / 255


def text_tf(text: str) -> torch.Tensor:
    """Bytes of the text, zero-padded: (L,)."""
    ids = torch.zeros(L, dtype=torch.long)
    data = list(text.encode())[:L]
    ids[: len(data)] = torch.tensor(data)
    return ids


def good(key: str, index: int, ext: str = "png") -> list[tuple[str, bytes]]:
    sample = make_sample("train", index, image_size=16)
    fmt = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[ext]
    return [(f"{key}.{ext}", encode(sample.image, fmt)), (f"{key}.txt", sample.caption.encode())]


def stream(shards, **options):
    """``build_dataset`` with this file's transforms and decoder on a single rank, ``options`` overriding."""
    defaults = dict(
        image_transform=image_tf, text_transform=text_tf, decode_image=pil_decode, rank=0, world_size=1
    )
    return build_dataset(shards, **{**defaults, **options})


def load_all(
    shards, num_workers: int, image_transform=image_tf, **kwargs
) -> tuple[list[str], dict[str, int]]:
    dataset = stream(shards, image_transform=image_transform, batch_size=3, **{**ONE_PASS, **kwargs})
    loader = ShardLoader(dataset, num_workers=num_workers)
    keys = []
    for batch in loader:
        assert batch["pixel_values"].shape[1:] == (3, 8, 8) and batch["input_ids"].shape[1:] == (L,)
        assert batch["pixel_values"].dtype == torch.float32 and batch["input_ids"].dtype == torch.long
        keys += batch["__key__"]
    return keys, loader.skip_counts


# ----------------------------------------------------------------------------- corrupt shards


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory) -> tuple[list[str], list[str], dict[str, int]]:
    """Shards with every kind of damage; returns (shards, good keys, expected skip counts)."""
    root = tmp_path_factory.mktemp("corrupt")
    jpeg = encode(make_sample("train", 99, image_size=32).image, "JPEG")
    cmyk = encode(Image.new("CMYK", (12, 10), (0, 255, 255, 0)), "JPEG")
    members = [
        *good("a00", 0),
        *good("a01", 1, "jpg"),
        ("a02.jpg", jpeg[: len(jpeg) // 2]),
        ("a02.txt", b"a cut-off jpeg"),  # truncated image bytes
        ("a03.jpg", os.urandom(500)),
        ("a03.txt", b"random bytes"),  # not an image at all
        ("a04.jpg", cmyk),
        ("a04.txt", b"a cmyk jpeg"),  # valid: kept, converted to RGB
        ("a05.png", encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG")),
        ("a05.txt", b"one pixel"),  # valid
        ("a06.png", good("x", 6)[0][1]),
        ("a06.txt", b""),  # empty caption
        ("a07.png", good("x", 7)[0][1]),
        ("a07.txt", b" \n\t "),  # whitespace caption
        ("a08.webp", good("x", 8, "webp")[0][1]),
        ("a08.json", json.dumps({"text": "json caption"}).encode()),
        ("a09.png", good("x", 9)[0][1]),  # no caption
        ("a10.txt", b"no image"),  # no image
        ("a11.png", good("x", 11)[0][1]),
        ("a11.json", b"{not json"),  # unparseable json
        *good("a12", 12),
    ]
    a = write_tar(root / "shard-0.tar", members)
    b = write_tar(root / "shard-1.tar", [m for i in range(4) for m in good(f"b{i:02d}", 20 + i)])
    data = b.read_bytes()
    with tarfile.open(b) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "b02.png")  # cut inside its data
    b.write_bytes(data[: cut.offset_data + cut.size // 2])
    c = root / "shard-2.tar"
    c.write_bytes(os.urandom(3000))  # not a tar at all
    good_keys = ["a00", "a01", "a04", "a05", "a08", "a12", "b00", "b01"]
    expected = {
        "bad_image": 2,
        "empty_caption": 2,
        "missing_caption": 1,
        "missing_image": 1,
        "bad_caption": 1,
        "truncated": 1,
        "bad_shard": 1,
    }
    return [str(a), str(b), str(c)], good_keys, expected


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_shards_are_skipped_and_counted(corrupt_shards, num_workers, caplog):
    shards, good_keys, expected = corrupt_shards
    with caplog.at_level(logging.WARNING, logger="training.data"):
        keys, counts = load_all(shards, num_workers)
    assert sorted(keys) == good_keys
    assert counts == dict(sorted(expected.items()))
    if num_workers == 0:  # one warning per reason, naming the key and the shard
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == len(expected)
        assert any("a02 in " in w and "shard-0.tar" in w and "bad_image" in w for w in warnings)
        assert any("b02" in w and "truncated" in w for w in warnings)


def test_default_decoder_and_image_processor_keep_cmyk_and_one_pixel(corrupt_shards):
    """vision_tower's load_image and ImageProcessor: the same samples kept and skipped."""
    from training.data import default_decode_image
    from vision_tower import ImageProcessor

    shards, good_keys, expected = corrupt_shards
    keys, counts = load_all(shards, 0, ImageProcessor(image_size=8), decode_image=default_decode_image)
    assert sorted(keys) == good_keys
    assert counts == dict(sorted(expected.items()))


def test_too_many_skips_in_a_row_is_an_error(tmp_path):
    shard = write_tar(
        tmp_path / "bad.tar", [m for i in range(6) for m in [(f"k{i}.jpg", b"xx"), (f"k{i}.txt", b"t")]]
    )
    for workers in (0, 1):
        dataset = stream(str(shard), batch_size=2, max_consecutive_skips=4)
        with pytest.raises(ValueError) as raised:  # a data problem: one line on the command line
            next(iter(ShardLoader(dataset, num_workers=workers)))
        # the message itself, not torch's "Caught ... in DataLoader worker process 0" with its traceback
        assert str(raised.value).startswith("5 samples in a row were skipped, the last one k4 in "), workers
        assert "Traceback" not in str(raised.value)


def test_shard_specs(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"s-{i:03d}.tar", good(f"k{i}", i))
    brace = str(tmp_path / "s-{000..002}.tar")
    assert (
        expand_shards(brace) == expand_shards(tmp_path) == expand_shards([tmp_path / "s-000.tar", brace][1:])
    )
    assert len(expand_shards([str(tmp_path / "s-000.tar"), str(tmp_path / "s-{001..002}.tar")])) == 3
    with pytest.raises(FileNotFoundError, match="none of the 2 shards exist"):
        expand_shards(str(tmp_path / "nope-{0..1}.tar"))


def test_tokenize_one_and_batched_transforms(tmp_path):
    shard = write_tar(tmp_path / "s.tar", good("k0", 0) + good("k1", 1))

    def batch_tokenizer(texts: list[str]) -> torch.Tensor:
        return torch.stack([text_tf(t) for t in texts])  # (B, L)

    dataset = stream(
        str(shard),
        image_transform=lambda im: image_tf(im)[None],  # (1, 3, H, W)
        text_transform=TokenizeOne(batch_tokenizer),
        batch_size=2,
        resampled=False,
    )
    batch = next(iter(ShardLoader(dataset, num_workers=0)))
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["input_ids"].shape == (2, L)


# ----------------------------------------------------------------------------- splits


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("many")
    return [
        str(
            write_tar(
                root / f"m-{s:02d}.tar", [m for i in range(5) for m in good(f"s{s:02d}k{i}", 5 * s + i)]
            )
        )
        for s in range(6)
    ]


def test_one_pass_split_by_rank_is_disjoint(many_shards):
    per_rank = [load_all(many_shards, 0, rank=r, world_size=2, shuffle=True, seed=7)[0] for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(f"s{s:02d}k{i}" for s in range(6) for i in range(5))
    assert len(set(per_rank[0])) == len(per_rank[0]) == 15


def test_one_pass_split_by_worker_covers_each_sample_once(many_shards):
    keys, counts = load_all(many_shards, 2, rank=1, world_size=2, shuffle=True, seed=7)
    assert sorted(keys) == sorted(load_all(many_shards, 0, rank=1, world_size=2, shuffle=True, seed=7)[0])
    assert len(set(keys)) == len(keys) == 15 and counts == {}


def test_resampled_streams_differ_by_rank(many_shards):
    def first_keys(rank: int) -> list[str]:
        dataset = stream(many_shards, batch_size=4, rank=rank, world_size=2, shuffle_buffer=8)
        it = iter(ShardLoader(dataset, num_workers=0))
        return [k for _ in range(5) for k in next(it)["__key__"]]

    assert first_keys(0) != first_keys(1)
    assert first_keys(0) == first_keys(0)


# ----------------------------------------------------------------------------- exact resume


def test_batches_before():
    assert [batches_before(5, w, 2) for w in range(2)] == [3, 2]
    assert [batches_before(1, w, 3) for w in range(3)] == [1, 0, 0]
    assert batches_before(7, 0, 1) == 7 and batches_before(0, 1, 2) == 0


class CountingDecoder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, data: bytes) -> Image.Image:
        self.calls += 1
        return pil_decode(data)


def resume_dataset(shards: list[str], decoder=pil_decode):
    return stream(
        shards, batch_size=4, seed=11, rank=1, world_size=2, shuffle_buffer=10, decode_image=decoder
    )


def take(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert [b["__key__"] for b in got] == [b["__key__"] for b in want]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g["pixel_values"], w["pixel_values"], rtol=0, atol=0)
        torch.testing.assert_close(g["input_ids"], w["input_ids"], rtol=0, atol=0)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume(many_shards, corrupt_shards, num_workers):
    shards = many_shards + corrupt_shards[0][:2]  # bad samples and a truncated shard in the stream
    full = ShardLoader(resume_dataset(shards), num_workers=num_workers)
    it = iter(full)
    head = [next(it) for _ in range(5)]
    saved = json.loads(json.dumps(full.state_dict()))  # survives a JSON round trip
    tail = [next(it) for _ in range(6)]
    assert saved["step"] == 5 and full.step == 11 and full.skipped > 0
    assert len({k for b in head + tail for k in b["__key__"]}) > 20

    resumed = ShardLoader(resume_dataset(shards), num_workers=num_workers, resume_state=saved)
    assert_same_batches(take(resumed, 6), tail)
    assert resumed.state_dict() == full.state_dict()  # same position and skip counts

    replayed = ShardLoader(resume_dataset(shards), num_workers=num_workers, start_step=5)
    assert_same_batches(take(replayed, 6), tail)
    assert replayed.skip_counts == full.skip_counts


def test_resume_state_skips_without_decoding(many_shards, corrupt_shards):
    shards = many_shards + corrupt_shards[0][:2]
    full = ShardLoader(resume_dataset(shards), num_workers=0)
    it = iter(full)
    for _ in range(8):
        next(it)
    saved = full.state_dict()
    for _ in range(4):
        next(it)
    consumed_after = full.state_dict()["workers"]["0"]["raw"] - saved["workers"]["0"]["raw"]

    decoder = CountingDecoder()
    resumed = ShardLoader(resume_dataset(shards, decoder), num_workers=0, resume_state=saved)
    take(resumed, 4)
    assert 16 <= decoder.calls <= consumed_after < saved["workers"]["0"]["raw"]


def test_continuing_iteration_and_mismatched_state(many_shards):
    loader = ShardLoader(resume_dataset(many_shards), num_workers=0)
    first = take(loader, 3)
    second = take(loader, 2)  # a new iterator continues the endless stream
    fresh = take(ShardLoader(resume_dataset(many_shards), num_workers=0), 5)
    assert_same_batches(first + second, fresh)
    with pytest.raises(ValueError, match="num_workers"):
        ShardLoader(resume_dataset(many_shards), num_workers=2, resume_state=loader.state_dict())
    with pytest.raises(ValueError, match="start_step=3"):
        ShardLoader(
            resume_dataset(many_shards), num_workers=0, start_step=3, resume_state=loader.state_dict()
        )


# ----------------------------------------------------------------------------- truncated captions


@pytest.fixture(scope="module")
def short_tokenizer(tmp_path_factory):
    """The demo's tokenizer trained on the shapes captions, but cut at 6 tokens (</s> included)."""
    from training.demo import caption_corpus
    from training.tokenizer_train import train_tokenizer

    return train_tokenizer(caption_corpus(), tmp_path_factory.mktemp("tok"), vocab_size=128, max_length=6)


def expected_cut(tokenizer, captions: list[str]) -> int:
    """By hand: ids at a length no caption reaches, pieces counted up to the padding (</s> pads)."""
    full = tokenizer(captions, max_length=64)  # (N, 64)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    return int(((full != tokenizer.pad_token_id).sum(dim=1) + 1 > tokenizer.max_length).sum())


def truncation_dataset(shard, text_transform):
    return stream(shard, text_transform=text_transform, batch_size=8, **ONE_PASS)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_captions_are_counted_and_warned_once(tmp_path, short_tokenizer, num_workers, caplog):
    n = 40
    shard = write_tar(tmp_path / "s.tar", [m for i in range(n) for m in good(f"k{i:03d}", i)])
    want = expected_cut(short_tokenizer, [make_sample("train", i, image_size=16).caption for i in range(n)])
    assert 0 < want < n
    loader = ShardLoader(truncation_dataset(shard, TokenizeOne(short_tokenizer)), num_workers=num_workers)
    with caplog.at_level(logging.WARNING, logger="training.data"):
        batches = list(loader)
    assert sum(len(b["caption"]) for b in batches) == n  # cut captions are kept
    assert loader.samples_seen == n and loader.truncated_captions == want
    assert loader.skipped == 0  # not a skip reason
    warnings = [r.getMessage() for r in caplog.records if "were cut" in r.getMessage()]
    assert len(warnings) == 1 and "train a tokenizer that fits them" in warnings[0], warnings

    # the tokenizer itself as the text transform (as retrieval uses it) counts the same
    direct = ShardLoader(truncation_dataset(shard, short_tokenizer), num_workers=0)
    list(direct)
    assert direct.truncated_captions == want
    # a transform that cannot tell counts nothing, and there is nothing to warn about
    plain = ShardLoader(truncation_dataset(shard, text_tf), num_workers=0)
    list(plain)
    assert plain.truncated_captions == 0


def test_truncation_counts_survive_resume(tmp_path, short_tokenizer):
    n = 48
    shard = write_tar(tmp_path / "s.tar", [m for i in range(n) for m in good(f"k{i:03d}", i)])
    want = expected_cut(short_tokenizer, [make_sample("train", i, image_size=16).caption for i in range(n)])
    first = ShardLoader(truncation_dataset(shard, TokenizeOne(short_tokenizer)), num_workers=1)
    it = iter(first)
    for _ in range(2):
        next(it)
    saved = json.loads(json.dumps(first.state_dict()))
    assert first.samples_seen == 16 and saved["workers"]["0"]["samples"] == 16
    resumed = ShardLoader(
        truncation_dataset(shard, TokenizeOne(short_tokenizer)), num_workers=1, resume_state=saved
    )
    assert resumed.truncated_captions == first.truncated_captions  # carried over before any batch
    list(resumed)
    assert resumed.samples_seen == n and resumed.truncated_captions == want


def test_a_shard_set_without_a_readable_shard_is_refused_before_the_run(tmp_path):
    from training.data.shards import check_shard_specs

    good = write_tar(tmp_path / "good.tar", [("k0.txt", b"a red circle")])
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar" * 100)
    members = write_tar(tmp_path / "members.tar", [])
    check_shard_specs(train_shards=f"{good}::{junk}")  # one bad shard among good ones: skipped, counted
    for bad, why in ((empty, "not a tar archive"), (junk, "not a tar archive"), (members, "without members")):
        with pytest.raises(ValueError, match=f"data.val_shards: no shard holds a sample: {bad} is .*{why}"):
            check_shard_specs(train_shards=str(good), val_shards=str(bad))
    with pytest.raises(ValueError, match=r"\(and the 2 other shard\(s\) likewise\)"):
        check_shard_specs(train_shards=f"{empty}::{junk}::{members}")
