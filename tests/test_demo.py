"""The README's main job: `vision-tower demo` end to end (shortened), on 2 CPU ranks."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_trains_evaluates_exports_and_extracts(tmp_path):
    exe = shutil.which("vision-tower")
    assert exe, "the vision-tower console script is not on PATH: install the package (pip install -e .)"
    proc = subprocess.run(
        [exe, "demo", "--steps", "150"], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    out = tmp_path / "vision-tower-demo"  # the default folder, in the working directory
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.splitlines()[0] == f"vision-tower demo -> {out}"
    assert "every caption and zero-shot prompt fits in 16 tokens" in proc.stdout
    assert "were cut" not in proc.stderr  # neither the data pipeline nor zero-shot cut a caption or prompt
    assert "held-out zero-shot accuracy on 24 shape classes" in proc.stdout
    final = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["zeroshot_top1"] > 3 / 24, final  # 3x chance after 150 steps (the full demo: see README)
    for folder in ("siglip", "vision"):
        assert (out / "run" / "export" / folder / "model.safetensors").exists()
    assert (out / "features.safetensors").exists()
    # the README's eval commands on the demo's outputs
    from training.cli import main

    model = str(out / "run" / "export" / "siglip")
    assert main(["eval", "zero-shot", "--model", model, "--images", str(out / "shapes" / "zeroshot")]) == 0
    assert main(["eval", "retrieval", "--model", model, "--shards", str(out / "shapes" / "val")]) == 0
    assert (
        main(["eval", "retrieval", "--model", model]) == 2
    )  # --shards missing: a clear error, not a traceback
