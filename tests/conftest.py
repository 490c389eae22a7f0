"""Fixtures shared by several test modules; plain helpers live in ``tests/helpers/``."""

from __future__ import annotations

import pytest

from tests.helpers import vlm_reference as R
from tests.helpers.hardware import write_cpuinfo
from vision_tower import hardware
from vision_tower.hardware import read_cpuinfo_flags


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
