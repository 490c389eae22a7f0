"""The README's main job: `vision-tower demo` end to end (shortened), on 2 CPU ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from training.config import ROOT


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_trains_evaluates_exports_and_extracts(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "training.cli", "demo", "--out", str(tmp_path), "--steps", "150"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "held-out zero-shot accuracy on 24 shape classes" in proc.stdout
    final = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["zeroshot_top1"] > 3 / 24, final  # 3x chance after 150 steps (the full demo: see README)
    for folder in ("siglip", "vision"):
        assert (tmp_path / "run" / "export" / folder / "model.safetensors").exists()
    assert (tmp_path / "features.safetensors").exists()
    # the README's eval commands on the demo's outputs
    from training.cli import main

    model = str(tmp_path / "run" / "export" / "siglip")
    assert (
        main(["eval", "zero-shot", "--model", model, "--images", str(tmp_path / "shapes" / "zeroshot")]) == 0
    )
    assert main(["eval", "retrieval", "--model", model, "--shards", str(tmp_path / "shapes" / "val")]) == 0
    assert (
        main(["eval", "retrieval", "--model", model]) == 2
    )  # --shards missing: a clear error, not a traceback
