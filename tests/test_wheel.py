"""`pip install .` gives a working package: the wheel holds every source module and the configs the
code reads at run time, and its `vision-tower demo` runs from an empty folder with only the
installed copy importable (no source checkout on the path)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from training.runner.paths import ROOT

PACKAGES = ("vision_tower", "connectors", "training")


def _source_files() -> list[str]:
    """The files a checkout tracks (git), else everything under the repository root."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [f for f in out.splitlines() if (ROOT / f).is_file()]
    return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts]


def _copy_source(dst: Path) -> Path:
    """Build from a copy, so the checkout gets no build/ or *.egg-info of this test."""
    for name in _source_files():
        if name.split("/")[0] in (*PACKAGES, "configs") or name in ("pyproject.toml", "README.md"):
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dst / name)
    return dst


def _clean_env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


@pytest.mark.slow
@pytest.mark.distributed
def test_wheel_installs_apart_and_runs_the_demo_from_an_empty_folder(tmp_path):
    src = _copy_source(tmp_path / "src")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = subprocess.run(
        [*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = [f for f in _source_files() if f.split("/")[0] in PACKAGES and f.endswith(".py")]
    assert wanted and not [f for f in wanted if f not in names], "source modules missing from the wheel"
    shipped = [f for f in _source_files() if f.startswith("configs/") and f.endswith((".yaml", ".json"))]
    assert shipped and not [f for f in shipped if f"training/{f}" not in names], "configs missing"

    site = tmp_path / "site"
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel), "-q"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    env, empty = _clean_env(site), tmp_path / "empty"
    empty.mkdir()
    origin = subprocess.run(
        [
            sys.executable,
            "-c",
            "import training.demo, vision_tower.cli, vision_tower, connectors; "
            "import sys; print('\\n'.join(sorted({m.__file__ for n, m in sys.modules.items() "
            "if n.split('.')[0] in ('training', 'vision_tower', 'connectors') and getattr(m, '__file__', "
            "None)})))",
        ],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert origin.returncode == 0, origin.stderr[-3000:]
    outside = [f for f in origin.stdout.split() if not f.startswith(str(site))]
    assert not outside, f"modules imported from outside the installed copy: {outside}"

    exe = site / "bin" / "vision-tower"
    assert exe.exists(), sorted(p.name for p in (site / "bin").iterdir())
    demo = subprocess.run(
        [str(exe), "demo", "--steps", "3", "--vlm-steps", "2", "--ranks", "1", "--train-samples", "64"],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = empty / "vision-tower-demo"
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-4000:]
    assert demo.stdout.splitlines()[0] == f"vision-tower demo -> {out}"
    assert "every caption and zero-shot prompt fits in 16 tokens" in demo.stdout
    assert "held-out caption exact-match: " in demo.stdout
    for part in (
        "run/export/siglip/model.safetensors",
        "run/export/vision/model.safetensors",
        "features.safetensors",
        "decoder-tokenizer/tokenizer.json",  # the VLM stages ran from the shipped configs/vlm/*.yaml
        "vlm/align/export/native/config.json",
        "vlm/finetune/export/paligemma/model.safetensors",
    ):
        assert (out / part).is_file(), part
    assert sorted(p.name for p in empty.iterdir()) == ["vision-tower-demo"]  # nothing else written here
