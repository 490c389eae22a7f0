"""What a run guarantees, tested on real checkpoints of 2-rank runs: damaged checkpoints are found and
the previous intact one is resumed (or the run stops, naming the file); one run per out_dir; a
previous run is never replaced silently; non-finite steps stop the run without saving or exporting."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tests.test_pretrain as pretrain_tests
from training.runner.launch import launch_env
from training.runner.paths import ROOT

pytestmark = pytest.mark.distributed
shapes = pretrain_tests.shapes  # the fixture: shapes data and a tokenizer
_args, _launch, _losses = pretrain_tests._args, pretrain_tests._launch, pretrain_tests._losses
STEPS = {"run.steps": 6, "run.save_every": 2, "run.keep_checkpoints": 3}


def _cli(ranks: int, args: list[str], timeout: float = 240) -> tuple[int, str]:
    """Run `vision-tower ARGS` (torchrun for 2 ranks, a plain process for 1); (exit code, output)."""
    if ranks > 1:
        proc = _launch(ranks, args, wait=False)
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    cmd = [sys.executable, "-m", "vision_tower.cli", *args]
    done = subprocess.run(cmd, env=launch_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


def _damage(path: Path, offset: int = 1024, size: int = 4096) -> None:
    """Overwrite ``size`` bytes of ``path`` in place (a bad sector, a bad copy)."""
    data = bytearray(path.read_bytes())
    data[offset : offset + size] = bytes(range(256)) * (size // 256)
    path.write_bytes(bytes(data))


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(shapes, tmp_path_factory) -> Path:
    """A finished 2-rank ZeRO-2 run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("guarantees") / "base"
    _launch(2, _args(out, shapes, **STEPS))
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(finished, shapes, tmp_path):
    out = _copy(finished, tmp_path)
    ckpt = out / "checkpoints"
    _damage(ckpt / "step00000006" / "mp_rank_00_model_states.pt")
    code, log = _cli(2, _args(out, shapes, **STEPS) + ["--resume"])
    assert code == 0, log[-3000:]
    assert "step00000006 is damaged" in log and "mp_rank_00_model_states.pt" in log, log[-3000:]
    assert "older checkpoint step00000004" in log
    # resumed exactly from step 4: steps 5 and 6 give the uninterrupted run's losses
    before, after = _losses(finished), _losses(out)
    assert sorted(after) == list(range(1, 7))
    for step in (5, 6):
        assert after[step] == pytest.approx(before[step], rel=1e-5, abs=1e-6), step
    assert (ckpt / "COMMITTED").read_text() == "step00000006"


def test_no_intact_checkpoint_stops_the_resume_and_touches_nothing(finished, shapes, tmp_path):
    out = _copy(finished, tmp_path)
    for step in (2, 4, 6):
        _damage(out / "checkpoints" / f"step{step:08d}" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    before = _digests(out)
    code, log = _cli(2, _args(out, shapes, **STEPS) + ["--resume"])
    assert code != 0, log[-3000:]  # each rank exits with 2; torchrun reports the failure as 1
    errors = [line for line in log.splitlines() if "pretrain: error:" in line]
    assert len(errors) == 1 and "no intact checkpoint" in errors[0], log[-3000:]  # from rank 0 alone
    assert "step00000002/zero_pp_rank_1_mp_rank_00_optim_states.pt does not match its checksum" in errors[0]
    assert "training/runner" not in log  # no traceback through our code
    assert _digests(out) == before  # no checkpoint pruned or written, metrics and export as they were


class Payload:
    """Unpickling this writes the marker file: proof that a pickle was executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (shutil.copyfile, (os.devnull, self.marker))


def test_a_crafted_pickle_in_a_checkpoint_is_refused_at_resume(finished, shapes, tmp_path):
    """A .pt in the run folder that would run code when unpickled, its manifest entry recomputed so the
    checksums pass: resume reads DeepSpeed's files weights-only and refuses it, naming the file."""
    import torch

    from training.runner.checkpoints import _deepspeed_safe_globals

    out = _copy(finished, tmp_path)
    marker = tmp_path / "ran"
    for step in (2, 4, 6):
        folder = out / "checkpoints" / f"step{step:08d}"
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        for rank in (0, 1):
            name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            with torch.serialization.safe_globals(
                _deepspeed_safe_globals()
            ):  # a real file reads weights-only
                state = torch.load(folder / name, weights_only=True)
            state["extra"] = Payload(str(marker))
            torch.save(state, folder / name)
            data = (folder / name).read_bytes()
            manifest["files"][name] = [len(data), hashlib.sha256(data).hexdigest()]
        (folder / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    code, log = _cli(2, _args(out, shapes, **STEPS) + ["--resume"])
    assert code != 0, log[-3000:]
    assert not marker.exists()
    errors = [line for line in log.splitlines() if "pretrain: error:" in line]
    assert errors, log[-3000:]
    assert "optim_states.pt holds an object of shutil.copyfile: refused to unpickle it" in errors[0]
    assert "weights_only=False" not in log


def test_truncated_files_are_named_and_skipped(finished, tmp_path, caplog):
    from training.runner.checkpoints import CheckpointDamaged, find_intact

    ckpt = _copy(finished, tmp_path) / "checkpoints"
    data = ckpt / "step00000006" / "data_rank0.json"
    data.write_text(data.read_text()[:20])
    with caplog.at_level("WARNING"):
        assert find_intact(ckpt) == "step00000004"
    assert f"{data} has 20 bytes" in caplog.text
    states = ckpt / "step00000004" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    (ckpt / "step00000002" / "MANIFEST.json").unlink()  # as if killed before it was committed
    with pytest.raises(CheckpointDamaged, match=f"{states} has 1000 bytes, the manifest") as err:
        find_intact(ckpt)
    assert "\n" not in str(err.value)


def test_prune_keeps_the_last_intact_checkpoint_until_a_newer_one_is_committed(tmp_path):
    from training.runner.checkpoints import MANIFEST, prune

    for step, committed in ((2, True), (4, True), (6, False), (8, True)):
        folder = tmp_path / f"step{step:08d}"
        folder.mkdir()
        if committed:
            (folder / MANIFEST).write_text("{}")
    prune(tmp_path, keep=1, current="step00000006")  # step 6 is being written, not committed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000004", "step00000006", "step00000008"]
    prune(tmp_path, keep=1, current="step00000008")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step00000008"]


def test_a_second_run_on_the_same_out_dir_is_refused_while_the_first_lives(shapes, tmp_path):
    import signal

    out = tmp_path / "raced"
    first = _launch(2, _args(out, shapes, **{"run.steps": 40, "run.save_every": 20}), wait=False)
    deadline = time.time() + 120
    while not (out / "LOCK").exists():
        assert first.poll() is None and time.time() < deadline, "the first run never took the lock"
        time.sleep(0.05)
    # the first run (launcher and ranks) is held still while the second starts, so the race is run on any
    # machine (on a loaded one the first run used to end before the second reached the lock)
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        owner = json.loads((out / "LOCK").read_text())
        code, log = _cli(1, _args(out, shapes, **{"run.steps": 40}) + ["--resume", "auto"])
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    assert code == 2 and f"is used by another run (pid {owner['pid']}" in log, log[-2000:]
    rest, _ = first.communicate(timeout=400)
    assert first.returncode == 0, rest[-3000:]
    assert (out / "checkpoints" / "COMMITTED").read_text() == "step00000040"
    assert sorted(_losses(out)) == list(range(1, 41))  # only the first run's records
    assert json.loads((out / "config.json").read_text())["run"]["steps"] == 40
    assert not (out / "LOCK").exists()


def test_lock_of_a_dead_owner_is_recovered_and_a_live_or_remote_one_refused(tmp_path):
    import os
    import socket

    from training.runner.run_dir import RunDirError, RunLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
    with pytest.raises(RunDirError, match=f"used by another run \\(pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    lock.release()
    (tmp_path / "LOCK").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(RunDirError, match="run on host elsewhere .*delete"):
        RunLock(tmp_path).acquire()


def test_the_lock_follows_the_owner_process_not_what_its_file_says(tmp_path):
    """A live owner whose LOCK file is still empty (caught between create and write) is refused, and one
    killed with SIGKILL leaves a lock the next run takes."""
    from training.runner.run_dir import RunDirError, RunLock

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from training.runner.run_dir import RunLock; RunLock({str(tmp_path)!r}).acquire(); "
            "print('held', flush=True); import time; time.sleep(120)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / "LOCK").write_text("")  # what a reader saw before the owner wrote its name
        with pytest.raises(RunDirError, match="used by another run"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "LOCK").exists()


def test_a_previous_run_is_not_replaced_without_resume_or_overwrite(finished, shapes, tmp_path):
    out = _copy(finished, tmp_path)
    before = _digests(out)
    code, log = _cli(1, _args(out, shapes, **STEPS))
    assert code == 2 and "holds a run's outputs (step00000002, step00000004, step00000006" in log, log[-2000:]
    assert "--overwrite" in log and _digests(out) == before
    empty = tmp_path / "empty"
    code, log = _cli(1, _args(empty, shapes, **STEPS) + ["--resume"])
    assert code == 2 and "no committed checkpoint" in log and "--resume auto" in log, log[-2000:]
    code, log = _cli(1, _args(empty, shapes, **{**STEPS, "run.steps": 2}) + ["--resume", "auto"])
    assert code == 0 and (empty / "checkpoints" / "COMMITTED").read_text() == "step00000002", log[-2000:]
    code, log = _cli(1, _args(empty, shapes, **{**STEPS, "run.steps": 2, "run.seed": 1}) + ["--overwrite"])
    assert code == 0, log[-2000:]
    assert json.loads((empty / "config.json").read_text())["run"]["seed"] == 1


def test_non_finite_losses_stop_the_run_without_saving_or_exporting(shapes, tmp_path):
    out = tmp_path / "diverged"
    settings = {
        "run.steps": 12,
        "run.save_every": 1,
        "run.max_bad_steps": 2,
        "optim.lr": 1e30,
        "optim.warmup_steps": 0,
        "run.deepspeed": "configs/deepspeed/zero0.json",
    }
    code, log = _cli(1, _args(out, shapes, **settings))
    assert code == 2, log[-3000:]
    error = [line for line in log.splitlines() if "pretrain: error:" in line][0]
    losses = _losses(out)
    first_bad = min(s for s, v in losses.items() if v != v or abs(v) == float("inf"))
    assert f"step {first_bad + 1}: 2 bad steps in a row" in error, (error, losses)
    ckpt = out / "checkpoints"
    committed = (ckpt / "COMMITTED").read_text()
    assert committed == f"step{first_bad - 1:08d}"  # the last good step; nothing saved after it
    assert sorted(p.name for p in ckpt.glob("step*"))[-1] == committed
    assert not (out / "export").exists()


def test_resume_flag_forms():
    from vision_tower.cli import build_parser, main

    parser = build_parser()
    args = parser.parse_args(["pretrain", "--config", "c", "--resume", "run.steps=5", "optim.lr=1"])
    assert args.resume == "latest" and args.leading_overrides + args.overrides == [
        "run.steps=5",
        "optim.lr=1",
    ]
    assert parser.parse_args(["pretrain", "--config", "c", "--resume", "auto"]).resume == "auto"
    assert parser.parse_args(["pretrain", "--config", "c"]).resume is None
    for bad in (["--resume", "bogus"], ["--resume", "--overwrite"]):
        with pytest.raises(SystemExit) as exit_:
            main(["pretrain", "--config", "c", *bad])
        assert exit_.value.code == 2


@pytest.mark.parametrize(
    "argv, used",
    [
        (["a.tar", "--resume", "b.tar"], "b.tar"),  # after --resume: later on the line, it wins
        (["--resume", "b.tar", "a.tar"], "a.tar"),
        (["a.tar", "--resume", "auto", "b.tar"], "b.tar"),
    ],
)
def test_the_last_override_of_a_key_wins_on_either_side_of_resume(tmp_path, capsys, argv, used):
    """Once the value right after --resume came first, whatever the line said: `... x=A --resume x=B` ran
    with A, and the resume check never saw the change."""
    from vision_tower.cli import main

    args = [a if a.startswith("-") or a == "auto" else f"data.train_shards={tmp_path / a}" for a in argv]
    assert main(["pretrain", "--config", "configs/pretrain/demo_tiny.yaml", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"vision-tower pretrain: error: data.train_shards: none of the 1 shards exist, e.g. "
        f"'{tmp_path / used}' (from '{tmp_path / used}')"
    )


def test_resume_with_dropout_gives_the_uninterrupted_losses(shapes, tmp_path):
    """Dropout draws from the restored RNG state: nothing between the checkpoint load and the first
    resumed step (such as the data loader's seed) may draw from it first."""
    steps = {
        "run.steps": 4,
        "run.save_every": 2,
        "run.keep_checkpoints": 2,
        "run.deepspeed": "configs/deepspeed/zero0.json",
        "model.vision.attention_dropout": 0.3,
        "model.text.attention_dropout": 0.3,
    }
    full = tmp_path / "full"
    _launch(1, _args(full, shapes, **steps))
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    _damage(resumed / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt")  # resume from step 2
    _launch(1, _args(resumed, shapes, **steps) + ["--resume"])
    before, after = _losses(full), _losses(resumed)
    assert sorted(after) == [1, 2, 3, 4]
    assert [after[s] for s in (3, 4)] == pytest.approx([before[s] for s in (3, 4)], rel=1e-6, abs=1e-7)


@pytest.mark.parametrize(
    "command, config", [("pretrain", "pretrain/demo_tiny.yaml"), ("train-vlm", "vlm/tiny_align.yaml")]
)
def test_missing_validation_shards_stop_the_run_before_it_starts(tmp_path, capsys, command, config):
    """Found at the start, not at the final evaluation after the last step (when nothing is exported)."""
    from tests.helpers.shards import write_tar
    from vision_tower.cli import main

    train = write_tar(tmp_path / "train-0.tar", [("a.txt", b"a red circle")])
    out = tmp_path / "run"
    missing = tmp_path / "val-{000..001}.tar"
    args = [f"data.train_shards={train}", f"data.val_shards={missing}", f"run.out_dir={out}"]
    assert main([command, "--config", f"configs/{config}", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(
        f"vision-tower {command}: error: data.val_shards: none of the 2 shards exist"
    ), err
    assert not out.exists()  # no lock, no config.json, nothing
