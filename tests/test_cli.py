"""The `vision-tower` command: info, extract, convert, demo."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from torch.testing import assert_close

from tests.helpers.hf_reference import hf_siglip, hf_vision
from vision_tower import ImageProcessor, VisionTower, load_image
from vision_tower.cli import main


def _images(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40 + 7 * i, 31), (30 * i, 100, 200)).save(folder / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return folder


def test_info_prints_config_and_token_grid(tmp_path, capsys):
    hf_vision(seed=31, patch_size=8, image_size=32).save_pretrained(tmp_path / "m")
    assert main(["info", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert '"hidden_size": 48' in out and "448 px: 56x56 = 3136 tokens" in out
    assert main(["info", "preset:so400m_p14_384"]) == 0
    out = capsys.readouterr().out
    assert "384 px: 27x27 = 729 tokens  <- native" in out and "448 px: 32x32 = 1024 tokens" in out


def test_extract_writes_features_equal_to_the_tower_and_skips_bad_images(tmp_path, capsys):
    ref = hf_vision(seed=32, num_hidden_layers=3)
    ref.save_pretrained(tmp_path / "m")
    images = _images(tmp_path / "imgs")
    out = tmp_path / "f.safetensors"
    code = main(
        [
            "extract",
            "--model",
            str(tmp_path / "m"),
            "--images",
            str(images),
            "--out",
            str(out),
            "--image-size",
            "48",
            "--layer",
            "-2",
            "--batch-size",
            "2",
            "--dtype",
            "float32",  # equality with the fp32 reference below; auto may pick bf16
            "--quiet",
        ]
    )
    assert code == 0
    assert "1 skipped" in capsys.readouterr().out
    with safe_open(out, "pt") as f:
        meta = f.metadata()
        feats = f.get_tensor("patch_features")
        pooled = f.get_tensor("pooled")
    files = json.loads(meta["files"])
    assert len(files) == 3 and list(json.loads(meta["skipped"])) == [str(images / "broken.jpg")]
    assert feats.shape == (3, 36, 48) and pooled.shape == (3, 48) and json.loads(meta["grid"]) == [6, 6]
    pixels = ImageProcessor(image_size=48)([load_image(f) for f in files])
    with torch.no_grad():
        r = ref(pixels, interpolate_pos_encoding=True, output_hidden_states=True)
    assert_close(feats, r.hidden_states[-2], atol=1e-5, rtol=1e-5)
    assert_close(pooled, r.pooler_output, atol=1e-5, rtol=1e-5)


def _no_loading_problems(info: dict) -> None:
    """transformers' loading report: every weight came from the file, none was left over or resized."""
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
    assert not problems and not info.get("error_msgs"), problems or info["error_msgs"]


def test_convert_writes_transformers_layout(tmp_path):
    from transformers import SiglipImageProcessor, SiglipModel, SiglipVisionModel

    ref = hf_siglip(seed=33)
    ref.save_pretrained(tmp_path / "full")
    assert main(["convert", str(tmp_path / "full"), str(tmp_path / "out")]) == 0
    loaded, info = SiglipModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    _no_loading_problems(info)
    gen = torch.Generator().manual_seed(0)
    pixels, ids = torch.randn(3, 3, 32, 32, generator=gen), torch.randint(0, 97, (2, 12), generator=gen)
    with torch.no_grad():
        want, got = ref(input_ids=ids, pixel_values=pixels), loaded.eval()(input_ids=ids, pixel_values=pixels)
    assert_close(got.logits_per_image, want.logits_per_image, rtol=0, atol=0)
    assert_close(got.image_embeds, want.image_embeds, rtol=0, atol=0)
    assert_close(got.text_embeds, want.text_embeds, rtol=0, atol=0)

    args = ["convert", str(tmp_path / "full"), str(tmp_path / "vis"), "--vision-only", "--image-size", "64"]
    assert main([*args, "--no-head"]) == 0
    vis, info = SiglipVisionModel.from_pretrained(tmp_path / "vis", output_loading_info=True)
    _no_loading_problems(info)
    assert vis.config.image_size == 64 and not vis.config.vision_use_head
    assert SiglipImageProcessor.from_pretrained(tmp_path / "vis").size == {"height": 64, "width": 64}
    assert VisionTower.from_pretrained(tmp_path / "vis").config.image_size == 64
    big = torch.randn(2, 3, 64, 64, generator=gen)
    with torch.no_grad():  # the resized table equals transformers' own interpolation at 64 px
        want = ref.vision_model(big, interpolate_pos_encoding=True).last_hidden_state
        got = vis.eval()(big).last_hidden_state
    assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_source_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "neither an existing local path" in capsys.readouterr().err
    assert main(["info", "preset:nope"]) == 2
    assert "known presets" in capsys.readouterr().err


def _console_script() -> str:
    exe = shutil.which("vision-tower")
    assert exe, "the vision-tower console script is not on PATH: install the package (pip install -e .)"
    return exe


def test_console_script_help(capsys):
    # the installed script once (its start imports torch), then every command's --help through the same main
    exe = _console_script()
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: vision-tower" in proc.stdout, proc.stderr
    for sub in ("info", "extract", "convert", "demo", "pretrain", "train-tokenizer", "make-shapes", "eval"):
        assert sub in proc.stdout
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main([sub, "--help"])
        assert exit_.value.code == 0 and f"usage: vision-tower {sub}" in capsys.readouterr().out


def test_convert_refuses_to_write_over_its_source(tmp_path, capsys):
    src = tmp_path / "tower"
    assert main(["convert", "preset:tiny", str(src)]) == 0
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    capsys.readouterr()
    assert main(["convert", str(src), str(src), "--to", "timm", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vision-tower convert: error: ") and "is the checkpoint being converted" in err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_launch_lines_in_configs_and_readme_name_modules_that_exist():
    """``-m MODULE`` / ``--module MODULE`` in the shipped configs' comments and the README: a user copies
    them, so each module must import (``training.cli`` was once left there after it moved)."""
    import importlib.util
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [root / "README.md", *sorted((root / "configs").rglob("*.yaml"))]
    found = {}
    for path in files:
        for module in re.findall(r"(?:\s-m|--module)\s+([A-Za-z_][\w.]*)", path.read_text()):
            found.setdefault(module, path.name)
    assert "vision_tower.cli" in found
    missing = {m: where for m, where in found.items() if importlib.util.find_spec(m) is None}
    assert not missing, missing
