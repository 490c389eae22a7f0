"""Held-out data from a JSON Lines file and an image folder (``data.val_json`` + ``data.val_image_folder`` of
``train-vlm``, ``eval vlm --json FILE --image-folder DIR``): the same items, metrics and ``val_loss`` as
shards holding the same records, read in file order; the config's and the command's refusals."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from connectors import VisionLanguageModel
from tests.helpers import vlm_reference as R
from tests.helpers.vlm_data import (
    IMAGE_SIZE,
    conversation_model_keys,
    conversation_record,
    make_conversation_assets,
)
from training.data.chat import resolve_chat_template
from training.data.json_source import JsonSource
from training.data.vlm import builder_for
from training.demo.shapes import make_sample
from training.eval.vlm import read_eval_items
from training.runner.paths import ROOT
from training.tasks.vlm import VLMTask
from training.tasks.vlm_config import load_vlm_config
from vision_tower.cli import main

CONFIG = ROOT / "configs" / "vlm" / "tiny_conversations.yaml"
N_VAL = 6
MAX_LENGTH = 96


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    """The conversation assets (held-out shards of ``N_VAL`` records) plus ``val.jsonl``: the same records
    with their images in ``val_images/``, and a record whose image is missing third (skipped)."""
    root = tmp_path_factory.mktemp("valjson")
    found = make_conversation_assets(root / "data", n_train=1, n_val=N_VAL)
    lines = Path(found["val_json"]).read_text().splitlines()
    lines.insert(2, json.dumps(conversation_record("val", 99, "absent.png")))
    (root / "val.jsonl").write_text("\n".join(lines) + "\n")
    return found | {"val_json": str(root / "val.jsonl"), "root": str(root)}


@pytest.fixture(scope="module")
def vlm(assets) -> VisionLanguageModel:
    """The tiny tower, a random linear connector and the tiny decoder, LLaVA's layout and v1 template."""
    model = VisionLanguageModel(assets["tower"], "linear", assets["decoder"], attention="causal")
    model.chat_template = resolve_chat_template("v1", model.tokenizer)
    R.randomize_(model.connector, seed=5, scale=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def saved(assets, vlm) -> str:
    """``vlm`` saved in the native layout (its v1 template with it)."""
    model = Path(assets["root"]) / "model"
    vlm.save_pretrained(model, format="native")
    return str(model)


def _task(assets: dict[str, str], vlm: VisionLanguageModel, **data: object) -> VLMTask:
    """A VLM task of the shipped conversations config with ``data`` overrides, its model set to ``vlm``
    (no engine: evaluation only)."""
    values = {
        **conversation_model_keys(assets),
        "data.max_length": MAX_LENGTH,
        "data.eval_max_new_tokens": 3,
        **{f"data.{k}": v for k, v in data.items()},
    }
    task = VLMTask(load_vlm_config(CONFIG, [f"{k}={v}" for k, v in values.items()]))
    task.stage = SimpleNamespace(vlm=vlm)
    return task


def test_json_items_equal_the_shards_items_in_file_order(assets, vlm):
    builder = builder_for(vlm, max_length=MAX_LENGTH)
    from_shards = read_eval_items(builder, assets["val"])
    source = JsonSource(
        assets["val_json"], assets["val_images"], keys=("data.val_json", "data.val_image_folder")
    )
    from_json = read_eval_items(builder, source)
    assert len(from_shards) == len(from_json) == N_VAL  # the record with no image is passed over
    for i, (a, b) in enumerate(zip(from_shards, from_json, strict=True)):
        assert a.input_ids == b.input_ids and a.num_prefix == b.num_prefix and a.targets == b.targets
        assert a.prompt_ids == b.prompt_ids and a.image_sizes == b.image_sizes
        assert a.text == b.text == make_sample("val", i, image_size=IMAGE_SIZE).color
        assert a.images.equal(b.images)
    # the first 4 usable records, in file order: lines 1, 2, 4, 5 (line 3, val-99, names a missing image)
    first = read_eval_items(builder, source, 4)
    assert [item.key for item in first] == ["val-0", "val-1", "val-2", "val-3"]


def test_the_runs_evaluation_reads_data_val_json_as_it_reads_shards(assets, vlm):
    zero = SimpleNamespace(stage=2)
    shards = _task(assets, vlm, val_shards=assets["val"], eval_samples=4).evaluate(vlm, zero)
    task = _task(
        assets, vlm, val_json=assets["val_json"], val_image_folder=assets["val_images"], eval_samples=4
    )
    task.check_inputs()
    from_json = task.evaluate(vlm, zero)
    assert from_json["eval_samples"] == 4
    assert from_json == pytest.approx(shards, rel=1e-6)
    assert [item.key for item in task._eval[1]] == ["val-0", "val-1", "val-2", "val-3"]
    # all of them: a different loss than the first 4, still equal to the shards'
    every = _task(assets, vlm, val_shards=assets["val"], eval_samples=64).evaluate(vlm, zero)
    again = _task(
        assets, vlm, val_json=assets["val_json"], val_image_folder=assets["val_images"], eval_samples=64
    ).evaluate(vlm, zero)
    assert again["eval_samples"] == N_VAL and again == pytest.approx(every, rel=1e-6)
    assert every["val_loss"] != pytest.approx(shards["val_loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"val_shards": "v", "val_json": "v.jsonl"}, "set one of data.val_shards and data.val_json"),
        ({"val_image_folder": "images"}, "data.val_image_folder holds the images of data.val_json"),
        ({"val_shards": "v", "val_image_folder": "images"}, "data.val_image_folder holds the images"),
    ],
)
def test_the_config_refuses_val_json_with_shards_or_a_folder_alone(assets, vlm, data, message):
    with pytest.raises(ValueError, match=message):
        _task(assets, vlm, **data)


def test_missing_val_files_fail_before_training_naming_the_key(assets, capsys):
    base = ["train-vlm", "--config", str(CONFIG), f"model.tower={assets['tower']}"]
    base += [f"model.decoder={assets['decoder']}", "model.tokenizer=null"]
    base += [f"data.train_json={assets['train']}", f"data.image_folder={assets['images']}"]
    base += [f"run.out_dir={Path(assets['root']) / 'run'}"]
    missing = Path(assets["root"]) / "missing"
    cases = [
        ([f"data.val_json={missing}.jsonl"], f"data.val_json {missing}.jsonl is not a file"),
        (
            [f"data.val_json={assets['val_json']}", f"data.val_image_folder={missing}"],
            f"data.val_image_folder {missing} is not a folder",
        ),
    ]
    for overrides, message in cases:
        assert main([*base, *overrides]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"vision-tower train-vlm: error: {message}", err
    assert not (Path(assets["root"]) / "run").exists()


def test_eval_vlm_json_gives_the_val_loss_of_shards(assets, saved, capsys):
    base = ["eval", "vlm", "--model", saved, "--max-new-tokens", "3", "--dtype", "float32"]
    base += ["--max-length", str(MAX_LENGTH), "--max-samples", "5"]
    capsys.readouterr()
    assert main([*base, "--shards", assets["val"]]) == 0
    shards = json.loads(capsys.readouterr().out)
    assert main([*base, "--json", assets["val_json"], "--image-folder", assets["val_images"]]) == 0
    from_json = json.loads(capsys.readouterr().out)
    assert from_json["eval_samples"] == shards["eval_samples"] == 5
    assert from_json["val_loss"] == pytest.approx(shards["val_loss"], rel=1e-6)
    assert from_json["exact_match"] == shards["exact_match"]


def test_eval_vlm_json_refusals_are_one_line(assets, saved, capsys):
    base = ["eval", "vlm", "--model", saved, "--dtype", "float32"]
    missing = Path(assets["root"]) / "missing"
    cases = [  # before the model loads: one line
        (["--json", f"{missing}.jsonl"], f"--json {missing}.jsonl is not a file"),
        (
            ["--json", assets["val_json"], "--image-folder", str(missing)],
            f"--image-folder {missing} is not a folder",
        ),
        (
            ["--shards", assets["val"], "--image-folder", assets["val_images"]],
            "--image-folder holds the images of --json: give --json FILE too, or drop it",
        ),
    ]
    for args, message in cases:
        assert main([*base, *args]) == 2
        assert capsys.readouterr().err.strip() == f"vision-tower eval: error: {message}"
    # records that name images, no folder: the first sample read says which option to set
    assert main([*base, "--json", assets["val_json"]]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading progress
    expected = "the samples name image files: set --image-folder (the folder they are in)"
    assert last == f"vision-tower eval: error: {expected}"
    with pytest.raises(SystemExit):  # argparse: one of the two, not both
        main([*base, "--shards", assets["val"], "--json", assets["val_json"]])
    assert "not allowed with argument" in capsys.readouterr().err
