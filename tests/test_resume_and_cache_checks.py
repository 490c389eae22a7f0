"""What a resumed run may change, and how a feature cache is checked, through the installed command.

``--resume`` with a config whose model, data or optimizer settings differ from the checkpoint's is refused in
one line listing each ``key: old -> new`` and writes nothing; ``--resume-with-changes`` continues with
changed optimizer settings (the rate logged follows the new schedule) but never with a changed model; the
run length may change freely. A feature cache gives features only to a sample whose image bytes are the ones
they were computed from (images swapped inside a shard of the same size are refused, naming the sample);
a truncated cache file, a ``cache.json`` without ``identity`` and one that is not JSON each stop
``train-vlm`` in one line naming the file."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.shards import write_tar
from tests.helpers.vlm_data import make_assets, png
from training.data import iter_tar_samples
from training.data.feature_cache import FeatureCache
from training.data.shards import SkipCounter
from training.demo import caption_corpus
from training.demo.shapes import make_sample, make_shapes
from training.runner.launch import launch_env
from training.runner.paths import ROOT
from training.tokenizer_train import train_tokenizer
from vision_tower.cli import main

PRETRAIN = ROOT / "configs" / "pretrain" / "demo_tiny.yaml"
ALIGN = ROOT / "configs" / "vlm" / "tiny_align.yaml"
LR = 2e-3  # demo_tiny.yaml's optim.lr


def cli(args: list[str], timeout: float = 240) -> tuple[int, str, str]:
    """``vision-tower ARGS`` as a user runs it; (exit code, stdout, stderr)."""
    cmd = [sys.executable, "-m", "vision_tower.cli", *args]
    done = subprocess.run(cmd, env=launch_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def error_line(stderr: str, command: str, *, started: bool = False) -> str:
    """The one line an expected failure prints: nothing else on stderr, or, for a run that had ``started``,
    nothing but its progress bars."""
    head = f"vision-tower {command}: error: "
    if not started:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(head), stderr[-3000:]
        return lines[0]
    assert stderr.count(head) == 1, stderr[-3000:]
    line = stderr[stderr.index(head) :].splitlines()[0]
    rest = stderr.replace(line, "")
    assert "Traceback" not in rest and "error" not in rest.lower(), stderr[-3000:]
    return line


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------- resume


def pretrain_args(data: Path, out: Path, *overrides: str) -> list[str]:
    settings = {
        "data.train_shards": data / "data" / "train",
        "data.val_shards": "null",
        "data.zeroshot_dir": "null",
        "data.tokenizer": data / "tok",
        "data.batch_size": 8,
        "data.num_workers": 0,
        "data.shuffle_buffer": 8,
        "loss.chunk_size": 4,
        "optim.warmup_steps": 0,
        "optim.min_lr_ratio": 0.0,
        "run.log_every": 1,
        "run.eval_every": 0,
        "run.save_every": 0,
        "run.steps": 2,
        "run.out_dir": out,
    }
    return ["pretrain", "--config", str(PRETRAIN), *(f"{k}={v}" for k, v in settings.items()), *overrides]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A finished 2-step single-process pretraining run (its checkpoint at step 2) and its data folder."""
    data = tmp_path_factory.mktemp("resume")
    make_shapes(data / "data", n_train=64, n_val=8, shard_size=32, image_size=32, zeroshot_per_class=1)
    train_tokenizer(caption_corpus(), data / "tok", vocab_size=128, max_length=16)
    code, out, err = cli(pretrain_args(data, data / "run"))
    assert code == 0, (out + err)[-3000:]
    return data, data / "run"


def copy_run(finished, tmp_path: Path) -> tuple[Path, Path]:
    data, run = finished
    shutil.copytree(run, tmp_path / "run")
    return data, tmp_path / "run"


def lrs(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in records if "lr" in r and not r.get("final")}


def test_resume_with_a_changed_model_and_rate_is_refused_and_writes_nothing(finished, tmp_path):
    data, run = copy_run(finished, tmp_path)
    before = digests(run)
    # the overrides come after --resume, as a user adds them to the command that started the run
    args = pretrain_args(data, run, "--resume", "optim.lr=0.5", "model.vision={num_hidden_layers: 1}")
    code, _, err = cli(args)
    assert code == 2
    line = error_line(err, "pretrain")
    record = run / "checkpoints" / "step00000002" / "run_config.json"
    assert f"trained with ({record})" in line
    assert f"optim.lr: {LR} -> 0.5" in line and "model.vision.num_hidden_layers: null -> 1" in line, line
    assert "model.vision.num_hidden_layers cannot change on resume" in line
    assert "pass --resume-with-changes to continue from the checkpoint with the new optim.lr" in line
    assert digests(run) == before  # config.json, metrics, checkpoints: as they were
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == LR


def test_resume_with_changes_still_refuses_a_changed_model(finished, tmp_path):
    data, run = copy_run(finished, tmp_path)
    before = digests(run)
    text = "model.text={vocab_size: 128, num_hidden_layers: 1}"  # the config's vocab_size, one layer less
    args = pretrain_args(data, run, "run.steps=4", text, "optim.lr=0.5")
    code, _, err = cli([*args, "--resume", "--resume-with-changes"])
    assert code == 2
    line = error_line(err, "pretrain")
    assert "model.text.num_hidden_layers: null -> 1" in line and f"optim.lr: {LR} -> 0.5" in line
    assert "run.steps" not in line.split("(run.steps")[0]  # the run length may change: not listed
    assert "model.text.num_hidden_layers cannot change on resume" in line
    assert "--resume-with-changes applies the optimizer's and the schedule's settings only" in line
    assert digests(run) == before


def test_resume_with_changes_trains_on_at_the_new_rate_and_records_it(finished, tmp_path):
    data, run = copy_run(finished, tmp_path)
    lr = 4e-3
    code, out, err = cli(
        pretrain_args(data, run, "run.steps=4", f"optim.lr={lr}", "--resume", "--resume-with-changes")
    )
    assert code == 0, (out + err)[-3000:]
    # cosine from lr (no warm-up, floor 0) over 4 steps, evaluated at the step each rate is used for
    cosine = {s: lr * 0.5 * (1 + math.cos(math.pi * (s - 1) / 4)) for s in (3, 4)}
    logged = lrs(run)
    assert logged[1] == pytest.approx(LR) and logged[2] == pytest.approx(LR * 0.5)  # the first run's
    assert logged[3] == pytest.approx(cosine[3], rel=1e-9) and logged[4] == pytest.approx(cosine[4], rel=1e-9)
    saved = json.loads((run / "config.json").read_text())
    assert saved["optim"]["lr"] == lr and saved["run"]["steps"] == 4
    record = json.loads((run / "checkpoints" / "step00000004" / "run_config.json").read_text())
    assert record["optim"]["lr"] == lr


def test_resume_may_extend_the_run_without_the_flag(finished, tmp_path):
    data, run = copy_run(finished, tmp_path)
    code, out, err = cli(pretrain_args(data, run, "run.steps=3", "run.log_every=3", "--resume"))
    assert code == 0, (out + err)[-3000:]
    logged = lrs(run)
    assert sorted(logged) == [1, 2, 3]
    # step 3 at the rate of the schedule stretched to 3 steps (the 2-step schedule had ended at 0)
    assert logged[3] == pytest.approx(LR * 0.5 * (1 + math.cos(math.pi * 2 / 3)), rel=1e-9)
    saved = json.loads((run / "config.json").read_text())
    assert saved["run"]["steps"] == 3 and saved["run"]["log_every"] == 3 and saved["optim"]["lr"] == LR


def test_resume_with_changes_needs_resume(finished, tmp_path):
    data, _ = finished
    code, _, err = cli([*pretrain_args(data, tmp_path / "new"), "--resume-with-changes"])
    assert code == 2
    assert "--resume-with-changes goes with --resume" in error_line(err, "pretrain")
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- feature cache


def members(order: list[int]) -> list[tuple[str, bytes]]:
    """Samples s0.. with their own caption, the image of sample ``order[i]`` under key ``s{i}``."""
    out = []
    for i, j in enumerate(order):
        out.append((f"s{i}.png", png(make_sample("train", j, image_size=32).image)))
        out.append((f"s{i}.txt", make_sample("train", i, image_size=32).caption.encode()))
    return out


def swappable_pair() -> tuple[int, int]:
    """Two of the first samples whose images take the same number of tar blocks: swapped, the shard keeps
    its size to the byte."""
    blocks = {}
    for i in range(8):
        size = -(-len(png(make_sample("train", i, image_size=32).image)) // 512)
        if size in blocks:
            return blocks[size], i
        blocks[size] = i
    raise AssertionError("no two images of the same block count")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict[str, Path]:
    """VLM assets, one 8-sample shard and the feature cache ``vision-tower extract --shards`` made of it."""
    root = tmp_path_factory.mktemp("cache")
    assets = make_assets(root / "assets", n_train=8, n_val=8)
    shard = write_tar(root / "shards" / "part-0.tar", members(list(range(8))))
    out = root / "cache"
    args = ["--model", assets["tower"], "--shards", str(shard), "--out", str(out), "--quiet"]
    assert main(["extract", *args]) == 0
    return {"root": root, "shard": shard, "cache": root / "cache", **{k: Path(v) for k, v in assets.items()}}


def align_args(cache: dict[str, Path], out: Path, shards: Path, features: Path) -> list[str]:
    settings = {
        "model.tower": cache["tower"],
        "model.decoder": cache["decoder"],
        "model.tokenizer": "null",
        "data.train_shards": shards,
        "data.val_shards": "null",
        "data.feature_cache": features,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "data.shuffle_buffer": 0,
        "data.max_length": 40,
        "run.steps": 2,
        "run.save_every": 0,
        "run.out_dir": out,
        "export.formats": "[native]",
    }
    return ["train-vlm", "--config", str(ALIGN), *(f"{k}={v}" for k, v in settings.items())]


def swapped_shard(cache: dict[str, Path], folder: Path) -> tuple[Path, int, int]:
    a, b = swappable_pair()
    order = list(range(8))
    order[a], order[b] = b, a
    shard = write_tar(folder / "part-0.tar", members(order))
    assert shard.stat().st_size == cache["shard"].stat().st_size  # the size check cannot see it
    return shard, a, b


def test_swapped_images_are_refused_by_the_cache_naming_the_sample(cache, tmp_path):
    shard, a, b = swapped_shard(cache, tmp_path)
    features = FeatureCache(cache["cache"])
    features.check_shards([str(shard)])  # same name, same size
    for sample in iter_tar_samples(str(shard), SkipCounter(10)):
        if sample["__key__"] in (f"s{a}", f"s{b}"):
            with pytest.raises(ValueError, match=f"sample {sample['__key__']} of .* has another image"):
                features.load(sample)
        else:
            assert features.load(sample)[0].shape[0] == 1  # (1, N, D): unchanged samples still load


def test_train_vlm_stops_at_a_swapped_image_in_one_line(cache, tmp_path):
    shard, a, _ = swapped_shard(cache, tmp_path / "shards")
    out = tmp_path / "run"
    code, _, err = cli(align_args(cache, out, shard.parent, cache["cache"]))
    assert code == 2
    line = error_line(err, "train-vlm", started=True)
    assert "has another image than the one the feature cache" in line and str(shard) in line, line
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step*"))


def _truncate(folder: Path) -> tuple[Path, str]:
    file = sorted(folder.glob("*.safetensors"))[0]
    size = file.stat().st_size
    file.write_bytes(file.read_bytes()[: size // 2])
    return file, f"{file} has {size // 2} bytes, {folder / 'cache.json'} records {size} (truncated"


def _drop_identity(folder: Path) -> tuple[Path, str]:
    index = folder / "cache.json"
    data = json.loads(index.read_text())
    del data["identity"]
    index.write_text(json.dumps(data))
    return index, f"{index} is not a feature cache index this version reads (no identity)"


def _not_json(folder: Path) -> tuple[Path, str]:
    index = folder / "cache.json"
    index.write_text('{"version": 2, "identity": ')
    return index, f"{index} is not valid JSON (Expecting value"


@pytest.mark.parametrize("damage", [_truncate, _drop_identity, _not_json])
def test_a_damaged_cache_stops_train_vlm_in_one_line_naming_the_file(cache, tmp_path, damage):
    features = tmp_path / "cache"
    shutil.copytree(cache["cache"], features)
    _, phrase = damage(features)
    kept = digests(features)
    out = tmp_path / "run"
    code, _, err = cli(align_args(cache, out, cache["shard"], features))
    assert code == 2
    line = error_line(err, "train-vlm")
    assert phrase in line and "extract the features again" in line, line
    assert digests(features) == kept  # the user's cache is left as it was
    assert not out.exists()  # refused before anything was set up


# ------------------------------------------------------------------------- resume of train-vlm, in process


def test_train_vlm_resume_with_a_changed_tower_is_refused_and_a_longer_run_resumes(cache, tmp_path, capsys):
    """The command that made the run, with changes written after ``--resume`` (where they win over the same
    keys before it): a changed tower and rate are refused and nothing is written; then the run is extended
    in the same process (a refused run leaves no stale process group behind)."""
    out = tmp_path / "run"
    args = align_args(cache, out, cache["shard"], "null")
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    before = digests(out)
    capsys.readouterr()
    assert main([*args, "--resume", "model.tower=preset:tiny", "optim.lr=0.5"]) == 2
    line = [x for x in capsys.readouterr().err.splitlines() if "vision-tower train-vlm: error: " in x]
    assert len(line) == 1, line
    assert (
        f'model.tower: "{cache["tower"]}" -> "preset:tiny"' in line[0] and "optim.lr: 0.003 -> 0.5" in line[0]
    )
    assert "model.tower cannot change on resume" in line[0]
    assert digests(out) == before  # config.json keeps the values the checkpoint was trained with
    assert main([*args, "--resume", "run.steps=3"]) == 0, capsys.readouterr().err[-3000:]
    assert sorted(lrs(out)) == [2, 3]  # each run logs its last step (run.log_every is 10)
    assert json.loads((out / "config.json").read_text())["model"]["tower"] == str(cache["tower"])
