"""A /proc/cpuinfo of the tests' own, to pretend a CPU has (or lacks) bf16 matmul instructions."""

from __future__ import annotations

from pathlib import Path


def write_cpuinfo(path: Path, flags: str) -> Path:
    """A two-processor /proc/cpuinfo at ``path`` whose ``flags`` line is ``flags``."""
    block = f"processor\t: 0\nvendor_id\t: X\nmodel name\t: test\nflags\t\t: {flags}\nbogomips\t: 1\n\n"
    path.write_text(block + block.replace("processor\t: 0", "processor\t: 1"))
    return path
