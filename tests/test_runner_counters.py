"""Data accounting in metrics.jsonl is the total over all ranks, not rank 0's share: samples skipped
(per step and by reason at the end) and texts cut to the tokenizer's length (every task)."""

from __future__ import annotations

import pytest

from tests.helpers.distributed import run_ranks
from tests.helpers.runner_workers import counters_worker

pytestmark = pytest.mark.distributed


def test_skip_and_truncation_counts_are_summed_over_ranks(tmp_path):
    # rank 0 skips 1 bad image, rank 1 skips 2 bad images and 2 empty captions;
    # rank 0 cut 10 of its 100 texts, rank 1 20 of 200
    result = run_ranks(counters_worker, 2, str(tmp_path / "run"), backend=None, timeout=120)[0]
    assert [r["skipped"] for r in result["logged"]] == [5, 5]
    assert result["final"]["final"] and result["final"]["skip_counts"] == {"bad_image": 3, "empty_caption": 2}
    assert [r["truncated_captions"] for r in result["logged"]] == [30, 30]
    assert [r["truncated_share"] for r in result["logged"]] == [0.1, 0.1]
