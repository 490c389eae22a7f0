"""The feature cache: `vision-tower extract --shards` writes the tower's patch features keyed by sample;
stage align reads them in place of images (same rows, same skips); a cache made with another tower,
feature layer or resolution is refused, naming what differs."""

from __future__ import annotations

import pickle

import pytest
import torch

import training.data.feature_cache as fc
from connectors import ConnectorConfig
from tests.helpers.shards import ONE_PASS, write_tar
from tests.helpers.vlm_data import layout_for, png
from training.data import ShardLoader, iter_tar_samples, shard_dataset
from training.data.feature_cache import FeatureCache, cache_identity
from training.data.shards import SkipCounter, SkipSample
from training.data.vlm import PixelImages, VLMBuilder
from training.demo.decoders import word_tokenizer
from training.demo.shapes import make_sample
from vision_tower import ImageProcessor, VisionTower, load_image
from vision_tower.cli import main


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """Two shards (a bad image and a sample without an image in the second), a saved tower, and the cache
    `vision-tower extract --shards` made of them with file parts of 4 samples."""
    root = tmp_path_factory.mktemp("cache")
    members = [[], []]
    for i in range(11):
        s = make_sample("train", i, image_size=20)
        members[i // 6] += [(f"s{i:02d}.png", png(s.image)), (f"s{i:02d}.txt", s.caption.encode())]
    members[1] += [
        ("bad.png", b"\x89PNG not an image"),
        ("bad.txt", b"a red circle"),
        ("noimg.txt", b"a red"),
    ]
    shards = [str(write_tar(root / "shards" / f"part-{k}.tar", m)) for k, m in enumerate(members)]
    torch.manual_seed(3)
    VisionTower.from_preset("tiny").save_pretrained(root / "tower")
    fc.FILE_SAMPLES, saved = 4, fc.FILE_SAMPLES
    try:
        code = main(
            [
                "extract",
                "--model",
                str(root / "tower"),
                "--shards",
                str(root / "shards"),
                "--out",
                str(root / "cache"),
                "--batch-size",
                "2",
                "--layer",
                "-2",
                "--quiet",
            ]
        )
    finally:
        fc.FILE_SAMPLES = saved
    assert code == 0
    assert len(list((root / "cache").glob("part-0-*.safetensors"))) == 2  # 6 samples in files of 4
    return root, shards


def tower_of(root, **kwargs):
    return VisionTower.from_pretrained(root / "tower", use_head=False, **kwargs).eval()


def test_cached_features_are_the_towers_and_bad_images_are_recorded(cached):
    root, shards = cached
    cache = FeatureCache(root / "cache")
    tower = tower_of(root, feature_layer=-2)
    processor = ImageProcessor(image_size=32)
    seen, counter = 0, SkipCounter(10)
    for url in shards:
        for sample in iter_tar_samples(url, counter):
            if sample["__key__"] in ("bad", "noimg"):
                with pytest.raises(SkipSample) as err:
                    cache.load(sample)
                assert err.value.reason == {"bad": "bad_image", "noimg": "missing_image"}[sample["__key__"]]
                continue
            features, grid, sizes = cache.load(sample)
            with torch.no_grad():
                want = tower(processor(load_image(sample["png"]))).patch_features  # (1, 16, 64)
            torch.testing.assert_close(features, want, rtol=1e-5, atol=1e-6)
            assert grid == (4, 4) and sizes == [(32, 32)]
            seen, good = seen + 1, sample
    assert seen == 11
    assert cache.identity == cache_identity(tower, processor)
    again = pickle.loads(pickle.dumps(cache))  # open files are not carried to DataLoader workers
    assert again._keys == {} and torch.equal(again.load(good)[0], cache.load(good)[0])


LAYOUT = layout_for(ConnectorConfig("linear", 64, 32), 32, 8)


def vlm_builder(images):
    tok = word_tokenizer(["a photo of small medium large red green blue circle square triangle star"])
    return VLMBuilder(
        tok,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        layout=LAYOUT,
        images=images,
        max_length=64,
    )


def batches(builder, shards):
    dataset = shard_dataset(shards, builder, batch_size=4, **ONE_PASS)
    loader = ShardLoader(dataset, num_workers=0)
    return list(loader), loader.skip_counts


def test_rows_from_the_cache_equal_rows_from_images(cached):
    root, shards = cached
    pixels = PixelImages(ImageProcessor(image_size=32), LAYOUT, 8)
    from_images, skips_images = batches(vlm_builder(pixels), shards)
    from_cache, skips_cache = batches(vlm_builder(FeatureCache(root / "cache")), shards)
    assert skips_cache == skips_images == {"bad_image": 1, "missing_image": 1}
    tower = tower_of(root, feature_layer=-2)
    for a, b in zip(from_images, from_cache, strict=True):
        assert a["__key__"] == b["__key__"]
        for key in ("input_ids", "token_type_ids", "labels", "attention_mask"):
            assert torch.equal(a[key], b[key]), key
        with torch.no_grad():
            torch.testing.assert_close(
                b["patch_features"], tower(a["pixel_values"]).patch_features, rtol=1e-5, atol=1e-6
            )


def test_a_cache_of_another_tower_layer_or_resolution_is_refused(cached):
    root, shards = cached
    cache = FeatureCache(root / "cache")
    processor = ImageProcessor(image_size=32)
    cache.check(cache_identity(tower_of(root, feature_layer=-2), processor))  # the same: accepted
    torch.manual_seed(4)
    other = VisionTower.from_preset("tiny", feature_layer=-2, use_head=False)
    cases = [
        (cache_identity(other, processor), ["another tower ", "tower weights (fingerprint): cache"]),
        (
            cache_identity(tower_of(root, feature_layer=-1), processor),
            ["another feature layer", "cache -2, model -1"],
        ),
        (
            cache_identity(tower_of(root, feature_layer=-2, image_size=48), processor.with_image_size(48)),
            ["image size", "cache 32, model 48", "'height': 48"],
        ),
    ]
    for identity, phrases in cases:
        with pytest.raises(ValueError) as err:
            cache.check(identity)
        for phrase in phrases:
            assert phrase in str(err.value), (phrase, str(err.value))


def test_shards_the_cache_does_not_hold_are_refused(cached, tmp_path):
    root, shards = cached
    cache = FeatureCache(root / "cache")
    cache.check_shards(shards)
    extra = write_tar(tmp_path / "part-9.tar", [("x.txt", b"red")])
    with pytest.raises(ValueError, match="no features for 1 of the 3 shards"):
        cache.check_shards([*shards, str(extra)])
    changed = write_tar(tmp_path / "part-0.tar", [("x.txt", b"red")])
    with pytest.raises(ValueError, match="extract it again"):
        cache.check_shards([str(changed)])
    with pytest.raises(FileNotFoundError, match="not a feature cache"):
        FeatureCache(tmp_path)


def test_a_cache_written_in_bfloat16_belongs_to_the_same_tower(cached, tmp_path):
    """The tower's identity is taken from its stored weights, before the cast: a bf16 cache is accepted by
    the fp32 model and holds bf16 features close to the fp32 ones."""
    root, shards = cached
    summary = fc.extract_to_cache(
        str(root / "tower"), shards[:1], tmp_path / "bf16", feature_layer=-2, dtype="bfloat16", progress=False
    )
    assert summary.samples == 6
    half, full = FeatureCache(tmp_path / "bf16"), FeatureCache(root / "cache")
    half.check(full.identity)
    sample = next(iter_tar_samples(shards[0], SkipCounter(1)))
    features = half.load(sample)[0]
    assert features.dtype == torch.bfloat16
    torch.testing.assert_close(features.float(), full.load(sample)[0], rtol=0.05, atol=0.05)
