"""What a run may remove or replace in its ``run.out_dir``: ``--overwrite`` never removes an input of the
run, a fresh run never replaces files it finds there (nor a ``LOCK`` that is not a run's), and a save that
fails on a full disk is removed, said in one line, and leaves the last committed checkpoint (or the
earlier export) to use."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tests.test_pretrain as pretrain_tests
from tests.test_run_guarantees import _cli, _digests
from training.runner.launch import launch_env
from training.runner.paths import ROOT

pytestmark = pytest.mark.distributed
shapes = pretrain_tests.shapes  # the fixture: shapes data and a tokenizer
_args, _losses = pretrain_tests._args, pretrain_tests._losses
TWO_STEPS = {"run.steps": 2, "run.save_every": 0, "data.zeroshot_dir": "null", "data.val_shards": "null"}


def _error(log: str, command: str = "pretrain") -> str:
    lines = [line for line in log.splitlines() if line.startswith(f"vision-tower {command}: error:")]
    assert len(lines) == 1, log[-3000:]
    return lines[0]


def _previous_run(out: Path) -> None:
    """What a finished run leaves (content made up: only the names matter to the guards)."""
    (out / "checkpoints" / "step00000002").mkdir(parents=True)
    (out / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (out / "checkpoints" / "COMMITTED").write_text("step00000002")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / "config.json").write_text("{}")


# ----------------------------------------------------------------------------- --overwrite and inputs
def test_overwrite_refuses_to_remove_the_previous_stage_it_starts_from(shapes, tmp_path):
    """Stage 2 into the stage-1 folder with --overwrite: model.init_from is that folder's export."""
    out = tmp_path / "vlm"
    _previous_run(out)
    native = out / "export" / "native"
    native.mkdir(parents=True)
    (native / "config.json").write_text('{"model_type": "vision_tower_vlm"}')
    before = _digests(out)
    settings = {
        "model.init_from": native,
        "data.train_shards": shapes["data.train_shards"],
        "data.val_shards": shapes["data.val_shards"],
        "run.out_dir": out,
    }
    args = [
        "train-vlm",
        "--config",
        "configs/vlm/tiny_finetune.yaml",
        *(f"{k}={v}" for k, v in settings.items()),
    ]
    code, log = _cli(1, [*args, "--overwrite"])
    assert code == 2, log[-3000:]
    assert _error(log, "train-vlm") == (
        f"vision-tower train-vlm: error: model.init_from {native} lies inside what --overwrite would remove "
        f"from {out}: nothing was removed; write this run to another run.out_dir, or move the input out first"
    )
    assert _digests(out) == before and not (out / "LOCK").exists()


def test_overwrite_refuses_to_remove_a_tokenizer_inside_the_export(shapes, tmp_path):
    out = tmp_path / "run"
    _previous_run(out)
    tokenizer = out / "export" / "siglip"
    shutil.copytree(shapes["data.tokenizer"], tokenizer)
    before = _digests(out)
    code, log = _cli(1, _args(out, {**shapes, "data.tokenizer": tokenizer}, **TWO_STEPS) + ["--overwrite"])
    assert code == 2, log[-3000:]
    assert _error(log).startswith(
        f"vision-tower pretrain: error: data.tokenizer {tokenizer} lies inside what"
    )
    assert _digests(out) == before


def test_overwrite_removes_only_the_run_outputs_and_checks_every_input(tmp_path):
    from training.runner.run_dir import RUN_OUTPUTS, RunDirError, prepare

    out = tmp_path / "run"
    _previous_run(out)
    (out / "export").mkdir()
    (out / "data").mkdir()
    (out / "data" / "train-0.tar").write_bytes(b"tar")
    (tmp_path / "link").symlink_to(out / "checkpoints")  # an input reached through a link still counts
    inputs = [("data.train_shards", str(out / "data" / "train-0.tar")), ("model.init_from", str(tmp_path))]
    for key, path in [
        ("data.val_shards", str(tmp_path / "link" / "x.tar")),
        ("model.tower", str(out / "export")),
    ]:
        with pytest.raises(RunDirError, match=f"^{key} {path} lies inside what --overwrite would remove"):
            prepare(out, resume=None, overwrite=True, inputs=[*inputs, (key, path)])
        assert (out / "checkpoints" / "COMMITTED").exists()
    prepare(out, resume=None, overwrite=True, inputs=inputs)
    assert not any((out / name).exists() for name in RUN_OUTPUTS)
    assert (out / "data" / "train-0.tar").read_bytes() == b"tar"


# ----------------------------------------------------------------------------- a fresh run
def test_a_fresh_run_keeps_the_files_it_finds_and_names_them(shapes, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "notes"}')
    (out / "loss.png").write_bytes(b"my plot")
    before = _digests(out)
    code, log = _cli(1, _args(out, shapes, **TWO_STEPS))
    assert code == 2, log[-3000:]
    assert _error(log) == (
        f"vision-tower pretrain: error: {out} holds a run's outputs (loss.png, config.json): --overwrite "
        f"replaces them, --resume continues that run; or choose another run.out_dir"
    )
    assert _digests(out) == before and sorted(p.name for p in out.iterdir()) == ["config.json", "loss.png"]


@pytest.mark.parametrize("name", ["checkpoints", "metrics.jsonl", "loss.png", "config.json", "export"])
def test_each_file_a_run_writes_stops_a_fresh_run(tmp_path, name):
    from training.runner.run_dir import RunDirError, prepare

    if name in ("checkpoints", "export"):
        (tmp_path / name).mkdir()
        shown = name + "/"
    else:
        (tmp_path / name).write_text("x")
        shown = name
    with pytest.raises(RunDirError, match=f"holds a run's outputs \\({shown}\\): --overwrite replaces"):
        prepare(tmp_path, resume=None, overwrite=False)
    prepare(tmp_path, resume="auto", overwrite=False)  # --resume continues: nothing is removed
    assert (tmp_path / name).exists()


def test_a_lock_file_that_is_not_a_runs_is_never_taken_or_deleted(shapes, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    (out / "LOCK").write_text("do not delete: my lab's booking of this folder\n")
    code, log = _cli(1, _args(out, shapes, **TWO_STEPS))
    assert code == 2, log[-3000:]
    assert _error(log) == (
        f"vision-tower pretrain: error: {out / 'LOCK'} is not a run's lock (it holds other data): left as it "
        f"is; move it away or choose another run.out_dir"
    )
    assert (out / "LOCK").read_text() == "do not delete: my lab's booking of this folder\n"
    assert sorted(p.name for p in out.iterdir()) == ["LOCK"]


# ----------------------------------------------------------------------------- a full disk
def _full_disk(match: str, room: int, style: str, args: list[str]) -> tuple[int, str]:
    """``vision-tower ARGS`` on a disk with ``room`` bytes left for files whose path holds ``match``."""
    cmd = [sys.executable, "-m", "tests.helpers.full_disk", match, str(room), style, "--", *args]
    done = subprocess.run(cmd, env=launch_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    return done.returncode, done.stdout + done.stderr


def test_a_checkpoint_that_fills_the_disk_is_removed_and_the_last_one_resumes(shapes, tmp_path):
    """torch's writer fails at step 4 (after 4096 bytes, with no errno, as it does on a full disk): the
    partial step 4 is removed, step 2 stays committed, and --resume from it gives the same steps 3 and 4."""
    out = tmp_path / "full"
    steps = {**TWO_STEPS, "run.steps": 4, "run.save_every": 2}
    code, log = _full_disk("step00000004", 4096, "native", _args(out, shapes, **steps))
    assert code == 2, log[-3000:]
    ckpt = out / "checkpoints"
    step2 = sum(p.stat().st_size for p in (ckpt / "step00000002").iterdir() if p.name != "MANIFEST.json")
    assert _error(log) == (
        f"vision-tower pretrain: error: the disk is full: checkpoint step00000004 could not be written to "
        f"{ckpt / 'step00000004'} (0 bytes free there; the save needs about {step2 / 1024 / 1024:.1f} MiB): "
        f"removed {ckpt / 'step00000004'}; the last committed checkpoint step00000002 is intact (--resume "
        f"continues from it)"
    )
    assert sorted(p.name for p in ckpt.glob("step*")) == ["step00000002"]
    assert (ckpt / "COMMITTED").read_text() == "step00000002"
    failed = _losses(out)  # steps 3 and 4 ran before the save failed
    code, log = _cli(1, _args(out, shapes, **steps) + ["--resume"])
    assert code == 0, log[-3000:]
    resumed = _losses(out)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert [resumed[s] for s in (3, 4)] == pytest.approx([failed[s] for s in (3, 4)], rel=1e-6, abs=1e-7)
    assert (ckpt / "COMMITTED").read_text() == "step00000004"


def test_an_export_that_fills_the_disk_leaves_no_partial_folder(shapes, tmp_path):
    """safetensors' writer fails in export/siglip: no export/siglip (nor its temporary folder) is left, the
    final checkpoint is committed, and --resume writes the export, its files as the umask allows."""
    out = tmp_path / "full"
    code, log = _full_disk("/export/", 4096, "native", _args(out, shapes, **TWO_STEPS))
    assert code == 2, log[-3000:]
    error = _error(log)
    assert error.startswith(
        f"vision-tower pretrain: error: the disk is full: export siglip could not be written to "
        f"{out / 'export' / 'siglip'} (0 bytes free there; the save needs about "
    ), error
    assert error.endswith(": removed the partial write; no siglip was written"), error
    assert not (out / "export").exists() or list((out / "export").iterdir()) == []
    assert (out / "checkpoints" / "COMMITTED").read_text() == "step00000002"
    code, log = _cli(1, _args(out, shapes, **TWO_STEPS) + ["--resume"])
    assert code == 0, log[-3000:]
    assert sorted(p.name for p in (out / "export").iterdir()) == ["siglip", "vision"]
    umask = os.umask(0)
    os.umask(umask)
    weights = out / "export" / "siglip" / "model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o666 & ~umask
    assert (out / "export" / "vision").stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_failed_export_keeps_the_earlier_one_and_a_good_one_replaces_it(tmp_path):
    """The temporary sibling folder is renamed into place only once it is whole."""
    import errno

    from training.runner.writes import SaveFailed, atomic_folder

    target = tmp_path / "export" / "native"
    target.mkdir(parents=True)
    (target / "config.json").write_text("earlier")
    full = pytest.raises(
        SaveFailed, match=f"^the disk is full: export native could not be written to {target} "
    )
    with full, atomic_folder(target, "export native", needed=1 << 20) as tmp:
        (tmp / "config.json").write_text("new")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["native"]
    assert (target / "config.json").read_text() == "earlier"
    # not a write error: raised as it is, the earlier export kept
    with pytest.raises(KeyError), atomic_folder(target, "export native") as tmp:
        (tmp / "config.json").write_text("new")
        {}["bug"]
    assert (target / "config.json").read_text() == "earlier"
    with atomic_folder(target, "export native") as tmp:
        (tmp / "config.json").write_text("new")
        os.close(os.open(tmp / "model.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors does
        assert (target / "config.json").read_text() == "earlier"  # not yet in place
    assert [p.name for p in (tmp_path / "export").iterdir()] == ["native"]
    assert (target / "config.json").read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert (target / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_saved_weights_are_as_readable_as_the_umask_allows(tmp_path):
    """safetensors' writer creates its files 0600; a tower saved from Python gets the umask's mode."""
    from vision_tower import SiglipModel, get_preset

    umask = os.umask(0o027)  # a group-readable umask, unlike the default
    try:
        SiglipModel(get_preset("tiny")).vision.save_pretrained(tmp_path / "tower")
    finally:
        os.umask(umask)
    assert (tmp_path / "tower" / "model.safetensors").stat().st_mode & 0o777 == 0o640
