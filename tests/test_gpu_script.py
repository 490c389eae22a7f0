"""``benchmarks/gpu.sh`` without a GPU: it refuses with a clear message before doing any work (its full
run needs CUDA; ``--smoke`` runs the same steps on CPU at tiny shapes, by hand, in about 2 minutes)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from training.runner.paths import ROOT


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script would run in full")
def test_gpu_script_refuses_without_cuda(tmp_path):
    out = tmp_path / "table.md"
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "CUDA is not available here (use --smoke" in proc.stderr
    assert not out.exists()
