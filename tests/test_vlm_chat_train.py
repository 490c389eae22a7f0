"""``vision-tower train-vlm`` on conversations from a JSON Lines file and an image folder mixed with shards of
text-only conversations (``data.sources``, the shipped configs/vlm/tiny_conversations.yaml with LLaVA's v1
template otherwise), one rank, with held-out conversations."""

from __future__ import annotations

import json

import pytest

from tests.helpers.shards import write_tar
from tests.helpers.vlm_data import (
    QA_PROMPT,
    conversation_model_keys,
    make_conversation_assets,
    train_and_check_the_loss_falls,
)
from training.runner.paths import ROOT
from vision_tower.cli import main

pytestmark = pytest.mark.distributed
CONFIG = ROOT / "configs" / "vlm" / "tiny_conversations.yaml"


def test_train_vlm_on_a_json_lines_conversation_set(tmp_path, capsys):
    assets = make_conversation_assets(tmp_path / "data")
    # a second source mixed in at a quarter of the samples: shards of text-only conversations
    text_only = [
        (
            f"t{i}.json",
            json.dumps(
                {
                    "id": f"t{i}",
                    "conversations": [
                        {"from": "human", "value": QA_PROMPT},
                        {"from": "gpt", "value": "and its shape"},
                    ],
                }
            ).encode(),
        )
        for i in range(8)
    ]
    write_tar(tmp_path / "text" / "text-000.tar", text_only)
    out = tmp_path / "run"
    sources = [
        {"train_json": assets["train"], "image_folder": assets["images"], "weight": 3},
        {"train_shards": str(tmp_path / "text"), "weight": 1},
    ]
    values = {
        **conversation_model_keys(assets),
        "data.train_json": "null",
        "data.image_folder": "null",
        "data.sources": json.dumps(sources),
        "data.val_json": assets["val_json"],  # the held-out records of assets["val"], as JSON Lines
        "data.val_image_folder": assets["val_images"],
        "data.num_workers": 0,
        "data.eval_samples": 4,
        "data.eval_max_new_tokens": 3,
    }
    final = train_and_check_the_loss_falls(CONFIG, values, out)[-1]
    assert final["final"] and final["eval_samples"] == 4 and not final["skip_counts"], final
    assert (out / "export" / "native").is_dir()
    # `eval vlm` of the export on the held-out conversations, through the template the export saved (v1:
    # the tokenizer has none of its own)
    args = ["eval", "vlm", "--model", str(out / "export" / "native"), "--shards", assets["val"]]
    args += ["--max-samples", "4", "--max-new-tokens", "3", "--max-length", "96"]
    assert main([*args, "--dtype", "float32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eval_samples"] == 4
    assert result["val_loss"] == pytest.approx(final["val_loss"], rel=1e-4)
