"""Swapping the vision tower of a trained VLM by config (`train-vlm` with model.init_from and model.tower): a
VLM trained with tower A answers held-out questions; tower B (another width and patch size, so another
number of image tokens) replaces A, stage align fits a fresh connector with the decoder frozen bit for bit,
and the held-out exact match comes back; without align it is near chance. The swap is recorded in the run's
config, the exports and `vision-tower info`; the swapped PaliGemma export runs in transformers as saved; a
feature cache of the old tower is refused; a connector is kept only where the widths allow."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from connectors import FormatError, VisionLanguageModel
from tests.helpers.vlm_data import QA_PROMPT, TOWER_B, make_swap_assets
from tests.test_vlm_train import assert_same, command, run, weights
from training.data.shards import SkipCounter, iter_tar_samples
from training.data.vlm import builder_for
from training.runner import Zero
from training.runner.paths import ROOT
from training.tasks.vlm import VLMTask
from training.tasks.vlm_config import load_vlm_config
from vision_tower import VisionTower
from vision_tower.cli import main

pytestmark = pytest.mark.distributed
SWAP = ROOT / "configs" / "vlm" / "swap_tower.yaml"
SHARED = {
    "data.batch_size": 16,
    "data.num_workers": 0,
    "data.shuffle_buffer": 64,
    "data.eval_samples": 48,
    "data.eval_batch_size": 48,
    "data.eval_max_new_tokens": 2,
    "run.steps": 60,
    "run.log_every": 10,
    "run.eval_every": 0,
    "run.save_every": 0,
    "optim.warmup_steps": 0,
    "optim.min_lr_ratio": 1.0,
}
FP32 = Zero(0, {"bf16": {"enabled": False}})


def _args(values: dict) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_swap_assets(tmp_path_factory.mktemp("swap"))


@pytest.fixture(scope="module")
def original(assets, tmp_path_factory) -> Path:
    """Tower A, a linear connector and a random tiny Gemma trained together (stage finetune from parts) to
    answer what colour the shape is."""
    out = tmp_path_factory.mktemp("original") / "run"
    values = {
        "data.train_shards": assets["train"],
        "data.val_shards": assets["val"],
        "model.init_from": "null",
        "model.tower": assets["tower_a"],
        "model.decoder": "preset:tiny_gemma",
        "model.tokenizer": assets["tokenizer"],
        "data.max_length": 24,
        "run.out_dir": out,
        "optim.lr": 3e-3,
        "export.formats": "[native]",
        **SHARED,
    }
    run(command("finetune", _args(values)))
    return out


def swap_settings(assets: dict, original: Path, out: Path, **extra) -> list[str]:
    """configs/vlm/swap_tower.yaml on the test's data: tower B at 48 px (3x3 tokens) replaces tower A (4x4)
    in the original VLM."""
    values = {
        "model.init_from": original / "export" / "native",
        "model.tower": assets["tower_b"],
        "data.train_shards": assets["train"],
        "data.val_shards": assets["val"],
        "run.out_dir": out,
        **SHARED,
        **extra,
    }
    return _args(values)


@pytest.fixture(scope="module")
def swapped(assets, original, tmp_path_factory) -> Path:
    """The README's command: `vision-tower train-vlm --config configs/vlm/swap_tower.yaml` (stage align)."""
    out = tmp_path_factory.mktemp("swapped") / "run"
    cmd = [sys.executable, "-m", "vision_tower.cli", "train-vlm", "--config", str(SWAP)]
    run([*cmd, *swap_settings(assets, original, out)])
    return out


def final(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def held_out(val: str) -> list[tuple[bytes, str]]:
    """(png bytes, answer) of every held-out sample, from the shard's members."""
    members = {}
    for shard in sorted(Path(val).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return [(parts["png"], json.loads(parts["json"])["answer"]) for parts in members.values()]


def test_a_swap_that_learns_keeps_the_decoder_bit_for_bit(assets, original, swapped):
    before, after = final(original)["exact_match"], final(swapped)["exact_match"]
    answers = Counter(answer for _, answer in held_out(assets["val"]))
    chance = max(answers.values()) / sum(answers.values())  # the best a model blind to the image can do
    print(f"held-out exact match: tower A {before:.1%}, tower B after align {after:.1%}, chance {chance:.1%}")
    assert before >= 0.8 and before > 3 * chance, (before, chance)  # the original learned to look
    assert after >= 0.9 * before, (after, before)
    a, b = original / "export" / "native", swapped / "export" / "native"
    decoder = weights(a / "decoder")
    assert decoder.keys() == weights(b / "decoder").keys()
    assert_same(weights(b / "decoder"), decoder)
    vlm = VisionLanguageModel.from_pretrained(b)
    tower_b = VisionTower.from_pretrained(assets["tower_b"], image_size=48, use_head=False)
    assert vlm.tower.state_dict().keys() == tower_b.state_dict().keys()
    assert all(torch.equal(v, tower_b.state_dict()[k]) for k, v in vlm.tower.state_dict().items())
    assert (vlm.connector.name, vlm.connector.in_dim, vlm.connector.out_dim) == ("linear", 48, 64)
    assert vlm.num_image_tokens == 9 and vlm.processor.size == (48, 48)
    original_vlm = VisionLanguageModel.from_pretrained(a)
    assert original_vlm.num_image_tokens == 16
    assert vlm.image_token_id == original_vlm.image_token_id
    assert vlm.tokenizer.get_vocab() == original_vlm.tokenizer.get_vocab()


def test_without_align_the_swapped_model_is_near_chance(assets, original, tmp_path):
    """The model stage align starts from (fresh connector, nothing trained), evaluated as the run does."""
    answers = Counter(answer for _, answer in held_out(assets["val"]))
    chance = max(answers.values()) / sum(answers.values())
    cfg = load_vlm_config(SWAP, swap_settings(assets, original, tmp_path / "run"))
    task = VLMTask(cfg)
    torch.manual_seed(0)
    model = task.build_model(FP32)
    assert model.tower_swap["connector"] == "fresh" and model.num_image_tokens == 9
    start = task.evaluate(model, FP32)["exact_match"]
    print(f"held-out exact match of the swapped model before align: {start:.1%} (chance {chance:.1%})")
    assert start <= chance + 0.1, (start, chance)
    assert start < 0.5 * final(original)["exact_match"]


def test_the_swap_is_recorded_in_the_run_config_the_exports_and_info(assets, original, swapped, capsys):
    model = json.loads((swapped / "config.json").read_text())["model"]
    assert model["init_from"] == str(original / "export" / "native") and model["tower"] == assets["tower_b"]
    native, paligemma = swapped / "export" / "native", swapped / "export" / "paligemma"
    record = json.loads((native / "tower_swap.json").read_text())
    assert json.loads((paligemma / "tower_swap.json").read_text()) == record
    linear = {"name": "linear", "options": {"bias": True}, "out_dim": 64}
    assert record == {
        "tower": assets["tower_b"],
        "connector": "fresh",
        "replaced": {
            "tower": None,
            "checkpoint": str(original / "export" / "native"),
            "hidden_size": 64,
            "patch_size": 8,
            "image_size": 32,
            "feature_layer": -1,
            "connector": {**linear, "in_dim": 64},
            "tokens_per_image": 16,
        },
        "now": {
            "hidden_size": TOWER_B["hidden_size"],
            "patch_size": TOWER_B["patch_size"],
            "image_size": 48,
            "feature_layer": -1,
            "connector": {**linear, "in_dim": 48},
            "tokens_per_image": 9,
        },
    }
    capsys.readouterr()
    assert main(["info", str(paligemma)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"tower source: {assets['tower_b']} (swapped in; connector fresh)"
    assert lines[2].startswith(
        f"  replaced: the tower of {original / 'export' / 'native'}: width 64, patch 8"
    )
    assert "connector linear 48 -> 64, 9 tokens per image" in lines[3]
    assert lines[4] == "  tokens per image: 16 before the swap, 9 after"
    assert "tower: SigLIP width 48, 2 blocks, patch 16, 48 px -> 3x3 tokens" in lines[5]


def test_the_swapped_paligemma_export_runs_in_transformers_as_saved(assets, swapped):
    """transformers' PaliGemma and its AutoProcessor on the exported folder (a tower of another width than
    the one the decoder was trained with): our logits, and the run's held-out exact match."""
    from PIL import Image
    from torch.testing import assert_close
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    folder = swapped / "export" / "paligemma"
    assert json.loads((folder / "config.json").read_text())["vision_config"]["hidden_size"] == 48
    hf = PaliGemmaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    samples = held_out(assets["val"])
    images = [Image.open(io.BytesIO(png)).convert("RGB") for png, _ in samples]
    batch = processor(images=images, text=[f"<image>{QA_PROMPT}"] * len(images), return_tensors="pt")
    assert batch["pixel_values"].shape[-2:] == (48, 48)
    assert int((batch["input_ids"][0] == hf.config.image_token_id).sum()) == 9
    ours = VisionLanguageModel.from_pretrained(swapped / "export" / "native").eval()
    with torch.no_grad():
        theirs = hf(**batch).logits
        mine = ours(
            batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["token_type_ids"]
        )
        ids = hf.generate(**batch, max_new_tokens=1, do_sample=False)
    assert_close(mine.logits, theirs, atol=1e-4, rtol=1e-4)
    answers = processor.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    right = sum(a.strip() == answer for a, (_, answer) in zip(answers, samples, strict=True))
    assert right / len(samples) == final(swapped)["exact_match"], answers


def test_a_feature_cache_of_the_old_tower_is_refused_naming_the_difference(
    assets, original, tmp_path, capsys
):
    cache = tmp_path / "cache"
    args = ["--model", assets["tower_a"], "--shards", assets["train"], "--out", str(cache), "--quiet"]
    assert main(["extract", *args]) == 0
    capsys.readouterr()
    cfg = load_vlm_config(
        SWAP, swap_settings(assets, original, tmp_path / "run", **{"data.feature_cache": cache})
    )
    with pytest.raises(ValueError) as err:
        VLMTask(cfg).build_model(FP32)
    message = str(err.value)
    assert f"feature cache {cache} was made with another tower and image size" in message, message
    assert "image size: cache 32, model 48" in message and "extract the features again" in message


def test_a_connector_is_kept_where_the_widths_allow_and_another_kind_is_built_on_request(
    assets, original, tmp_path
):
    saved = VisionLanguageModel.from_pretrained(original / "export" / "native").connector.state_dict()
    out = tmp_path / "run"
    same_width = {"model.tower": assets["tower_a"], "model.keep_connector": "true"}  # tower A at 48 px
    cfg = load_vlm_config(SWAP, swap_settings(assets, original, out, **same_width))
    vlm = VLMTask(cfg).build_model(FP32)
    assert vlm.tower_swap["connector"] == "kept" and vlm.num_image_tokens == 36
    assert all(torch.equal(v, saved[k]) for k, v in vlm.connector.state_dict().items())
    assert vlm.tower_swap["now"]["tokens_per_image"] == 36
    # prompts and the data.max_length checks follow the new tokens per image (16 before the swap)
    with pytest.raises(ValueError, match="data.max_length 24 leaves no room for text: one image takes 36"):
        builder_for(vlm, max_length=24)
    shard = str(next(Path(assets["val"]).glob("*.tar")))
    item = builder_for(vlm, max_length=68).build(next(iter_tar_samples(shard, SkipCounter(1))))
    assert item.images.shape == (1, 3, 48, 48) and item.input_ids.count(vlm.image_token_id) == 36
    cfg = load_vlm_config(SWAP, swap_settings(assets, original, out, **{"model.keep_connector": "true"}))
    with pytest.raises(
        ValueError, match="the saved connector takes 64-wide features, model.tower .* gives 48"
    ):
        VLMTask(cfg).build_model(FP32)
    mlp = {"model.connector": "mlp2x_gelu", "model.feature_layer": -2}
    vlm = VLMTask(load_vlm_config(SWAP, swap_settings(assets, original, out, **mlp))).build_model(FP32)
    assert (vlm.connector.name, vlm.connector.in_dim, vlm.connector.options["act"]) == ("mlp", 48, "gelu")
    assert vlm.tower.feature_layer == -2 and vlm.tower_swap["now"]["feature_layer"] == -2
    # what a format cannot hold after the swap is refused before training
    cfg = load_vlm_config(
        SWAP, swap_settings(assets, original, out, **mlp, **{"export.formats": "[paligemma]"})
    )
    with pytest.raises(FormatError, match="export.formats lists 'paligemma': PaliGemma's projector is one"):
        VLMTask(cfg).build_model(FP32)
