"""The synthetic shapes dataset: deterministic, complete, and readable by the data pipeline."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.shards import ONE_PASS, pil_decode
from training.data import ShardLoader, build_dataset, expand_shards
from training.demo.shapes import (
    CLASSES,
    COLORS,
    SHAPES,
    ZEROSHOT_TEMPLATES,
    make_sample,
    make_shapes,
    named_class,
    same_class,
)


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _image_tf(image: Image.Image) -> torch.Tensor:
    return (
        torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255
    )  # (3, H, W)


def _text_tf(text: str) -> torch.Tensor:
    ids = torch.zeros(48, dtype=torch.long)
    data = list(text.encode())[:48]
    ids[: len(data)] = torch.tensor(data)
    return ids  # (48,)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return make_shapes(out, n_train=40, n_val=12, shard_size=16, image_size=32, seed=3, zeroshot_per_class=2)


def test_layout_and_summary(shapes):
    out = Path(shapes.out_dir)
    assert [Path(u).name for u in expand_shards(shapes.train)] == [
        "shapes-train-000000.tar",
        "shapes-train-000001.tar",
        "shapes-train-000002.tar",
    ]
    assert len(expand_shards(shapes.val)) == 1
    assert shapes.n_zeroshot == 2 * len(CLASSES) == 48
    folders = sorted(p.name for p in (out / "zeroshot").iterdir())
    assert len(folders) == len(COLORS) * len(SHAPES) == 24
    assert all(len(list((out / "zeroshot" / f).glob("*.png"))) == 2 for f in folders)
    info = json.loads((out / "classes.json").read_text())
    assert info["classes"] == list(CLASSES) and info["templates"] == list(ZEROSHOT_TEMPLATES)
    assert sorted(info["folders"]) == folders
    assert (out / "classes.txt").read_text().split("\n")[:2] == list(CLASSES[:2])
    with tarfile.open(expand_shards(shapes.train)[0]) as tar:
        names = tar.getnames()
    assert names[:3] == ["train-0000000.png", "train-0000000.txt", "train-0000000.json"]


def test_deterministic_for_a_seed(tmp_path, shapes):
    kwargs = {"n_train": 40, "n_val": 12, "shard_size": 16, "image_size": 32, "zeroshot_per_class": 2}
    make_shapes(tmp_path / "a", seed=3, **kwargs)
    make_shapes(tmp_path / "b", seed=4, **kwargs)
    first, again, other = _digests(Path(shapes.out_dir)), _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert first == again
    assert first.keys() == other.keys()
    assert sum(first[k] != other[k] for k in first) > 0.9 * len(first)


def test_sample_matches_its_labels():
    for index in range(30):
        sample = make_sample("train", index, image_size=48, seed=0)
        assert sample.image.size == (48, 48) and sample.image.mode == "RGB"
        assert f"{sample.color} {sample.shape}" in sample.caption
        assert sample.class_name in CLASSES
    forced = make_sample("zeroshot", 0, class_index=CLASSES.index("blue star"))
    assert forced.class_name == "blue star"
    # the shape's colour is the most saturated thing in the image
    pixels = np.asarray(make_sample("val", 1, image_size=64, class_index=0).image, dtype=np.float32)
    saturation = pixels.max(-1) - pixels.min(-1)  # (H, W)
    r, g, b = pixels[saturation > np.percentile(saturation, 95)].mean(0)
    assert r > 150 and g < 100 and b < 100  # class 0 is "red circle"


def test_readable_by_the_pipeline(shapes):
    dataset = build_dataset(
        shapes.train,
        image_transform=_image_tf,
        text_transform=_text_tf,
        batch_size=8,
        decode_image=pil_decode,
        **ONE_PASS,
    )
    loader = ShardLoader(dataset, num_workers=0)
    batches = list(loader)
    keys = [k for b in batches for k in b["__key__"]]
    assert keys == [f"train-{i:07d}" for i in range(40)]
    assert batches[0]["pixel_values"].shape == (8, 3, 32, 32)
    assert batches[-1]["pixel_values"].shape[0] == 40 - 8 * 4
    assert loader.skipped == 0
    captions = [c for b in batches for c in b["caption"]]
    assert all(any(c in cap for c in COLORS) and any(s in cap for s in SHAPES) for cap in captions)


@pytest.mark.parametrize(
    "generated, reference, same",
    [
        ("a photo of a red circle", "there is a red circle in the picture", True),  # template aside
        ("A  Red circle", "a small red circle", True),  # case, spacing and size aside
        ("a red square", "a red circle", False),
        ("a blue circle", "a red circle", False),
        ("a red blue circle", "a red circle", False),  # two colours named
        ("a red circle circle star", "a red circle", False),  # two shapes named
        ("a red circle red circle", "a red circle", True),  # a repeat names nothing else
        ("a photo of a", "a red circle", False),
        ("", "", False),  # naming nothing is never right
    ],
)
def test_same_class_compares_colour_and_shape_words(generated, reference, same):
    assert same_class(generated, reference) is same


def test_every_caption_names_its_class():
    for i in range(200):
        s = make_sample("train", i, image_size=16)
        assert named_class(s.caption) == s.class_name, s.caption


def test_make_shapes_refuses_an_existing_dataset_without_overwrite(tmp_path, capsys):
    from vision_tower.cli import main

    out = tmp_path / "data"
    args = ["make-shapes", "--out", str(out), "--n-train", "24", "--n-val", "8", "--shard-size", "8"]
    assert main(args + ["--image-size", "16"]) == 0
    (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in (out / "train").iterdir())
    assert len(before) == 3
    capsys.readouterr()
    assert (
        main(["make-shapes", "--out", str(out), "--n-train", "8", "--n-val", "8", "--shard-size", "8"]) == 2
    )
    assert "is a folder that is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "train").iterdir()) == before  # nothing replaced
    # --overwrite writes a whole new dataset: no stale shard of the old one is left, the user's file stays
    assert (
        main(
            [
                "make-shapes",
                "--out",
                str(out),
                "--n-train",
                "8",
                "--n-val",
                "8",
                "--shard-size",
                "8",
                "--overwrite",
            ]
        )
        == 0
    )
    assert [p.name for p in (out / "train").iterdir()] == ["shapes-train-000000.tar"]
    assert (out / "notes.txt").read_text() == "mine"


def test_stripes_marks_vanish_when_squashed_to_one_tile_and_stay_in_anyres_tiles(tmp_path):
    """The resolution task's premise: for one canvas, the four answers differ by at most 2 grey levels
    once squashed to the tower's size (SigLIP's bicubic resize), and by the full range in anyres' tiles."""
    from connectors.layouts import CropShape, build_layout
    from training.demo.stripes import PAIRS, draw_mark
    from vision_tower import ImageProcessor
    from vision_tower.cli import main

    processor = ImageProcessor(image_size=32)
    anyres = build_layout("anyres", CropShape((32, 32), 16, (4, 4)))
    for seed in range(3):
        images = [draw_mark(answer, 32, np.random.default_rng(seed)) for answer in PAIRS]
        squashed = [processor(image)[0] for image in images]
        tiles = [anyres.crops(image, processor)[0][1:] for image in images]  # without the base image
        assert max(float((s - squashed[0]).abs().max()) for s in squashed) <= 2 * 2 / 255 + 1e-6
        assert min(float((t - tiles[0]).abs().max()) for t in tiles[1:]) > 1.5
    args = ["make-shapes", "--kind", "stripes", "--out", str(tmp_path), "--n-train", "6", "--n-val", "3"]
    assert main([*args, "--image-size", "32", "--shard-size", "4"]) == 0
    with tarfile.open(tmp_path / "train" / "stripes-train-000001.tar") as tar:
        names = sorted(tar.getnames())
        meta = json.loads(tar.extractfile(names[0]).read())
    assert names == ["train-0000004.json", "train-0000004.png", "train-0000005.json", "train-0000005.png"]
    assert meta["prompt"] == "mark colour" and meta["answer"] in PAIRS
