"""A mixture of training sources (``data.sources``): samples drawn from each source in proportion to its
weight, whatever the sizes of its shards or pieces, the same stream after a resume, and configs that say
what is wrong with a source."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from tests.helpers.shards import write_tar
from training.data import ShardLoader, shard_dataset
from training.data.mixture import build_mixture
from training.tasks.vlm_config import load_vlm_config


@dataclass
class Item:
    text: str
    truncated: bool = False


class KeyBuilder:
    """Items of each sample's key (``<source>-<n>``), batches of their keys."""

    def build(self, sample: dict) -> Item:
        return Item(sample["__key__"])

    def collate(self, items: list[Item]) -> dict:
        return {"__key__": [it.text for it in items]}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Shards of 2 samples (``a``), shards of 25 (``b``), and a JSON Lines file of 7 records (``c``)."""
    root = tmp_path_factory.mktemp("mixture")
    for s in range(6):
        write_tar(root / "a" / f"a-{s}.tar", [(f"a-{s}-{i}.txt", b"x") for i in range(2)])
    for s in range(2):
        write_tar(root / "b" / f"b-{s}.tar", [(f"b-{s}-{i}.txt", b"x") for i in range(25)])
    (root / "c.jsonl").write_text(
        "".join(json.dumps({"prompt": "p", "answer": str(i)}) + "\n" for i in range(7))
    )
    return root


def mixed_loader(root, weights, resume_state=None, num_workers=0):
    specs = [
        {"train_shards": str(root / "a"), "weight": weights[0]},
        {"train_shards": str(root / "b"), "weight": weights[1]},
        {"train_json": str(root / "c.jsonl"), "weight": weights[2]},
    ]
    dataset = shard_dataset(
        (),
        KeyBuilder(),
        batch_size=10,
        seed=3,
        rank=0,
        world_size=1,
        shuffle_buffer=20,
        source=build_mixture(specs, str),
    )
    return ShardLoader(dataset, num_workers=num_workers, resume_state=resume_state)


def shares(batches: list[dict]) -> dict[str, float]:
    keys = [k for b in batches for k in b["__key__"]]
    return {s: sum(k.startswith(s) for k in keys) / len(keys) for s in ("a", "b", "c")}


def test_each_source_gives_its_weights_share_of_samples_whatever_its_shard_sizes(sources):
    it = iter(mixed_loader(sources, (3, 1, 1)))
    got = shares([next(it) for _ in range(60)])  # 600 samples
    # per sample, not per shard: a's 2-sample shards still give it 3/5 of the stream
    assert got["a"] == pytest.approx(0.6, abs=0.06), got
    assert got["b"] == pytest.approx(0.2, abs=0.05), got
    assert got["c"] == pytest.approx(0.2, abs=0.05), got
    it = iter(mixed_loader(sources, (1, 0.25, 2.75)))
    got = shares([next(it) for _ in range(60)])
    assert got == pytest.approx({"a": 0.25, "b": 0.0625, "c": 0.6875}, abs=0.06), got


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_mixture_resumes_with_the_same_samples(sources, num_workers):
    full = mixed_loader(sources, (3, 1, 1), num_workers=num_workers)
    it = iter(full)
    for _ in range(4):
        next(it)
    saved = json.loads(json.dumps(full.state_dict()))
    tail = [next(it)["__key__"] for _ in range(5)]
    resumed = mixed_loader(sources, (3, 1, 1), resume_state=saved, num_workers=num_workers)
    rit = iter(resumed)
    assert [next(rit)["__key__"] for _ in range(5)] == tail
    with pytest.raises(ValueError, match="mixture"):  # other weights: another stream, refused
        iter(mixed_loader(sources, (1, 1, 1), resume_state=saved, num_workers=num_workers)).__next__()


@pytest.mark.parametrize(
    "sources_value, message",
    [
        ("[]", "data.sources must be a non-empty list"),
        ("[{train_shards: a, weight: 0}]", r"data.sources\[0\].weight must be a number above 0"),
        ("[{train_shards: a}, {train_shards: b, train_json: c}]", r"data.sources\[1\]: set one of"),
        ("[{train_shards: a, image_folder: i}]", r"data.sources\[0\].image_folder holds the images"),
        ("[{train_shard: a}]", r"data.sources\[0\]: unknown key\(s\) \['train_shard'\]"),
        ("[a.tar]", r"data.sources\[0\] must be a mapping"),
    ],
)
def test_a_bad_source_is_refused_naming_it(sources_value, message):
    base = ["model.tower=preset:tiny", "model.decoder=preset:tiny_gemma", "model.tokenizer=tok"]
    base.append(f"data.sources={sources_value}")
    with pytest.raises(ValueError, match=message):
        load_vlm_config(None, base)
    with pytest.raises(ValueError, match="drop data.train_shards"):
        load_vlm_config(None, [*base[:3], "data.sources=[{train_shards: a}]", "data.train_shards=b"])
    cfg = load_vlm_config(
        None, [*base[:3], "data.sources=[{train_shards: a, weight: 1e-3}, {train_json: c}]"]
    )
    assert [s["weight"] for s in cfg.data.sources] == [0.001, 1.0]
