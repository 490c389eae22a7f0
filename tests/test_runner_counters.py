"""Data accounting in metrics.jsonl is the total over all ranks, not rank 0's share: samples skipped
(per step and by reason at the end) and, in VLM training, texts truncated to ``data.max_length``."""

from __future__ import annotations

import pytest

from tests._runner_workers import counters_worker, vlm_truncated_worker
from tests.distributed_utils import run_ranks

pytestmark = pytest.mark.distributed


def test_skip_counts_are_summed_over_ranks(tmp_path):
    # rank 0 skips 1 bad image, rank 1 skips 2 bad images and 2 empty captions
    result = run_ranks(counters_worker, 2, str(tmp_path / "run"), backend=None, timeout=120)[0]
    assert [r["skipped"] for r in result["logged"]] == [5, 5]
    assert result["final"]["final"] and result["final"]["skip_counts"] == {"bad_image": 3, "empty_caption": 2}


def test_vlm_truncated_texts_are_summed_over_ranks():
    # rank 0 truncated 10 texts, rank 1 20
    assert run_ranks(vlm_truncated_worker, 2, [], timeout=120) == [30, 30]
