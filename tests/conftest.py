"""Fixtures shared by several test modules; plain helpers live in ``tests/helpers/``."""

from __future__ import annotations

import pytest

from tests.helpers import vlm_reference as R
from tests.helpers.hardware import write_cpuinfo
from vision_tower import hardware
from vision_tower.hardware import read_cpuinfo_flags

LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_process_group_left_behind():
    """A training command run in-process joins a process group of one and sets the launcher's variables
    (``MASTER_PORT`` among them) in ``os.environ``: after the test both are undone, so that a later test's
    subprocess neither inherits the port (still listened on) nor finds a stale group."""
    import os

    before = {k: os.environ.get(k) for k in LAUNCHER_VARIABLES}
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from training.runner.engine import leave_process_group

        leave_process_group()
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """``cpu(flags)``: pretend the CPU reports these flags (a /proc/cpuinfo written to a temporary file
    and parsed as the real one is)."""

    def use(flags: str) -> None:
        parsed = read_cpuinfo_flags(write_cpuinfo(tmp_path / "cpuinfo", flags))
        monkeypatch.setattr(hardware, "cpu_flags", lambda: parsed)

    return use


@pytest.fixture(scope="session")
def decoders(tmp_path_factory):
    """A tiny random decoder folder (model and tokenizer) per decoder family of the VLM references."""
    root = tmp_path_factory.mktemp("decoders")
    return {fam: R.decoder_folder(fam, root / fam, seed=i) for i, fam in enumerate(R.FAMILIES)}


@pytest.fixture
def tensor_reads(monkeypatch) -> list[str]:
    """The keys of every tensor the tower loader reads from safetensors files from now on, in order (to check
    that loading a tower out of a VLM checkpoint never reads its decoder)."""
    import vision_tower.checkpoint as ckpt

    read: list[str] = []
    real_open = ckpt.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr(ckpt, "safe_open", Recording)
    return read
