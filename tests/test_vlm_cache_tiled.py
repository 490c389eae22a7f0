"""A feature cache of a tiled image layout (`vision-tower extract --shards --image-layout anyres`): each
sample's crops and its image's size, read in place of the images with the same rows and the same loss as
the tower on the pixels; a cache is refused by a model of another layout (naming both), and a cache written
before layouts were recorded still serves `fixed`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import training.data.feature_cache as fc
from connectors import VisionLanguageModel
from tests.helpers import vlm_reference as R
from tests.helpers.shards import ONE_PASS, write_tar
from tests.helpers.vlm_data import SIZED, sized_qa_members
from training.data import ShardLoader, iter_tar_samples, shard_dataset
from training.data.cache_index import INDEX
from training.data.feature_cache import FeatureCache, cache_identity, tower_layout
from training.data.shards import SkipCounter
from training.data.vlm import builder_for
from training.tasks.vlm import model_inputs
from vision_tower import ImageProcessor, VisionTower
from vision_tower.checkpoint import save_safetensors
from vision_tower.cli import main


def extract(root, out, *layout):
    args = ["extract", "--model", str(root / "tower"), "--shards", str(root / "shards"), "--out", str(out)]
    assert main([*args, *layout, "--batch-size", "3", "--quiet"]) == 0  # 3 crops a batch: samples split


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """Two shards of prompt/answer samples of three image sizes (the second with a bad image), a saved
    tower, and the caches `extract --shards` made of them with the anyres and the fixed layouts."""
    root = tmp_path_factory.mktemp("tiled")
    members = sized_qa_members(7)
    bad = [("bad.png", b"\x89PNG not an image"), ("bad.json", b'{"prompt": "what", "answer": "red"}')]
    write_tar(root / "shards" / "part-0.tar", members[:8])
    write_tar(root / "shards" / "part-1.tar", members[8:] + bad)
    R.tower(seed=5).save_pretrained(root / "tower")
    extract(root, root / "anyres", "--image-layout", "anyres")
    extract(root, root / "fixed")
    return root, sorted(str(p) for p in (root / "shards").glob("*.tar"))


def vlm_of(root, layout):
    tower = VisionTower.from_pretrained(root / "tower", use_head=False)
    processor = ImageProcessor(image_size=32)
    return VisionLanguageModel(
        tower,
        "pixel_shuffle",
        R.decoder("gemma"),
        tokenizer=R.tokenizer(),
        processor=processor,
        image_layout=layout,
    ).eval()


def batches(builder, shards):
    loader = ShardLoader(shard_dataset(shards, builder, batch_size=4, **ONE_PASS), num_workers=0)
    return list(loader), loader.skip_counts


def test_rows_and_loss_from_an_anyres_cache_equal_those_from_images(cached):
    root, shards = cached
    vlm = vlm_of(root, "anyres")
    cache = FeatureCache(root / "anyres")
    cache.check(cache_identity(vlm.tower, vlm.image_processor(), vlm.layout))  # the model's own: accepted
    from_images, skips_images = batches(builder_for(vlm, max_length=96), shards)
    from_cache, skips_cache = batches(builder_for(vlm, max_length=96, images=cache), shards)
    assert skips_cache == skips_images == {"bad_image": 1}
    sizes = []
    for a, b in zip(from_images, from_cache, strict=True):
        assert a["__key__"] == b["__key__"]
        for key in ("input_ids", "token_type_ids", "labels", "attention_mask", "image_sizes"):
            assert torch.equal(a[key], b[key]), key
        sizes += [tuple(s) for s in b["image_sizes"].tolist()]
        crops = sum(vlm.layout.num_crops(s) for s in b["image_sizes"].tolist())
        assert b["patch_features"].shape == (crops, 16, vlm.tower.config.hidden_size)
        with torch.no_grad():
            torch.testing.assert_close(
                b["patch_features"], vlm.tower(a["pixel_values"]).patch_features, rtol=1e-5, atol=1e-6
            )
            loss_images = vlm(**model_inputs(a)).loss
            loss_cache = vlm(**model_inputs(b)).loss
        torch.testing.assert_close(loss_cache, loss_images, rtol=1e-5, atol=1e-5)
    assert sorted(set(sizes)) == sorted(SIZED) and len(sizes) == 7  # the images' own sizes, 3 to 5 crops each


NEXT = [
    [32, 64],
    [64, 32],
    [64, 64],
    [96, 32],
    [32, 96],
]  # LLaVA-NeXT's grids of 32 px tiles: anyres' default


def test_a_cache_of_another_image_layout_is_refused_naming_both(cached):
    root, _ = cached
    fixed, anyres = vlm_of(root, "fixed"), vlm_of(root, "anyres")
    cases = [
        (root / "anyres", fixed, f"image layout: cache 'anyres' (grid_pinpoints={NEXT}), model 'fixed'"),
        (root / "fixed", anyres, f"image layout: cache 'fixed', model 'anyres' (grid_pinpoints={NEXT})"),
    ]
    for folder, vlm, phrase in cases:
        with pytest.raises(ValueError) as err:
            FeatureCache(folder).check(cache_identity(vlm.tower, vlm.image_processor(), vlm.layout))
        assert "another image layout" in str(err.value) and phrase in str(err.value), str(err.value)
        assert "--image-layout " + vlm.layout.name in str(err.value)
    tower, processor = fixed.tower, fixed.image_processor()
    FeatureCache(root / "fixed").check(cache_identity(tower, processor, fixed.layout))
    # defaults filled in: anyres with LLaVA-NeXT's grids spelled out (a LLaVA-NeXT config) is the same layout
    FeatureCache(root / "anyres").check(
        cache_identity(tower, processor, tower_layout(tower, "anyres", grid_pinpoints=NEXT))
    )
    other = tower_layout(tower, "anyres", grid_pinpoints=[[32, 64], [64, 32]])
    with pytest.raises(ValueError, match=r"model 'anyres' \(grid_pinpoints=\[\[32, 64\], \[64, 32\]\]\)"):
        FeatureCache(root / "anyres").check(cache_identity(tower, processor, other))
    # anyres_max_9 is anyres_max with max_tiles=9 and LLaVA-OneVision's 6x6 grids
    identity = cache_identity(tower, processor, tower_layout(tower, "anyres_max_9"))
    layout = identity["layout"]
    assert layout["name"] == "anyres_max" and layout["options"]["max_tiles"] == 9
    assert (
        len(layout["options"]["grid_pinpoints"]) == 36 and [192, 192] in layout["options"]["grid_pinpoints"]
    )
    with pytest.raises(
        ValueError, match=r"cache 'anyres' .*, model 'anyres_max' \(grid_pinpoints=.*max_tiles=9\)"
    ):
        FeatureCache(root / "anyres").check(identity)


def test_layout_options_on_the_command_line(cached, tmp_path, capsys):
    root, _ = cached
    extract(root, tmp_path / "a", "--image-layout", "anyres_max", "--layout-option", "max_tiles=4")
    assert "(39 crops, image layout anyres_max)" in capsys.readouterr().out  # 7 samples of 3, 5 and 10 crops
    tower = VisionTower.from_pretrained(root / "tower", use_head=False)
    layout = tower_layout(tower, "anyres_max", max_tiles=4)
    FeatureCache(tmp_path / "a").check(cache_identity(tower, ImageProcessor(image_size=32), layout))
    common = ["extract", "--model", str(root / "tower"), "--out", str(tmp_path / "b")]
    for args, message in [
        (
            ["--shards", "x", "--layout-option", "max_tiles=4"],
            "--layout-option is an option of --image-layout",
        ),
        (["--shards", "x", "--image-layout", "anyres", "--layout-option", "tiles"], "expects KEY=VALUE"),
        (["--shards", str(root / "shards"), "--image-layout", "tiles"], "unknown image layout 'tiles'"),
        (["--images", "x.png", "--image-layout", "anyres"], "--image-layout applies to --shards"),
    ]:
        assert main([*common, *args, "--quiet"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vision-tower")]
        assert len(err) == 1 and message in err[0], err


def test_a_cache_written_before_layouts_still_serves_fixed(cached, tmp_path):
    """No layout in cache.json's identity and no image sizes in the files: one fixed crop a sample, the
    tower's size as the image's."""
    root, shards = cached
    old = tmp_path / "old"
    old.mkdir()
    index = json.loads((root / "fixed" / INDEX).read_text())
    del index["identity"]["layout"]
    for entry in index["shards"].values():
        for name in entry["files"]:
            with safe_open(root / "fixed" / name, framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
                digests = f.metadata()[fc.DIGESTS]
            save_safetensors(tensors, old / name, metadata={fc.DIGESTS: digests})
            entry["files"][name] = (old / name).stat().st_size
    (old / INDEX).write_text(json.dumps(index))
    cache, new = FeatureCache(old), FeatureCache(root / "fixed")
    fixed, anyres = vlm_of(root, "fixed"), vlm_of(root, "anyres")
    cache.check(cache_identity(fixed.tower, fixed.image_processor(), fixed.layout))
    with pytest.raises(ValueError, match="image layout: cache 'fixed', model 'anyres'"):
        cache.check(cache_identity(anyres.tower, anyres.image_processor(), anyres.layout))
    for sample in iter_tar_samples(shards[0], SkipCounter(1)):
        features, grid, sizes = cache.load(sample)
        assert features.shape[0] == 1 and grid == (4, 4) and sizes == [(32, 32)]
        assert torch.equal(features, new.load(sample).values) and new.load(sample).sizes == sizes
