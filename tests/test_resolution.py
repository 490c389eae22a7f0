"""The resolution task of configs/vlm/tiny_stripes.yaml, end to end: the colour of a small checkerboard mark
on canvases of 2x2, 1x2 and 2x1 tower-sized tiles, which a squash to one tile cancels. The same random
tower, decoder, data and 100 steps of ``vision-tower train-vlm`` in the ``anyres`` and the ``fixed`` layout:
anyres answers the held-out questions (its tiles carry the mark to the tower), fixed guesses (chance 25%)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.distributed import small_run
from training.demo.decoders import word_tokenizer
from training.demo.stripes import PAIRS, PROMPT
from training.runner.launch import launch_env
from training.runner.paths import ROOT
from vision_tower.cli import main

CONFIG = ROOT / "configs" / "vlm" / "tiny_stripes.yaml"


def _train(data: Path, tokenizer: Path, out: Path, layout: str) -> dict:
    """``vision-tower train-vlm --config configs/vlm/tiny_stripes.yaml`` in ``layout`` for 100 steps; its
    final metrics (held-out exact match on 96 samples)."""
    overrides = {
        **small_run(out),
        "model.tokenizer": tokenizer,
        "model.image_layout": layout,
        "data.train_shards": data / "train",
        "data.val_shards": data / "val",
        "data.batch_size": 32,
        "data.eval_samples": 96,
        "run.steps": 100,
        "run.log_every": 20,
        "run.save_every": 0,
        "export.formats": "[native]",
    }
    cmd = [sys.executable, "-m", "vision_tower.cli", "train-vlm", "--config", str(CONFIG)]
    cmd += [f"{k}={v}" for k, v in overrides.items()]
    proc = subprocess.run(cmd, env=launch_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def test_anyres_reads_the_mark_that_the_fixed_layout_squashes_away(tmp_path):
    data = tmp_path / "stripes"
    args = ["make-shapes", "--kind", "stripes", "--out", str(data), "--image-size", "32"]
    assert main([*args, "--n-train", "1024", "--n-val", "96", "--shard-size", "512"]) == 0
    tokenizer = tmp_path / "tokenizer"
    word_tokenizer([PROMPT, " ".join(PAIRS)]).save_pretrained(tokenizer)
    anyres = _train(data, tokenizer, tmp_path / "anyres", "anyres")
    fixed = _train(data, tokenizer, tmp_path / "fixed", "fixed")
    assert anyres["eval_samples"] == fixed["eval_samples"] == 96
    print(f"held-out exact match: anyres {anyres['exact_match']:.3f}, fixed {fixed['exact_match']:.3f}")
    assert anyres["exact_match"] >= 0.8, anyres
    assert fixed["exact_match"] <= 0.45, fixed  # chance: 0.25 (4 colours); 96 samples: one sd 0.044
