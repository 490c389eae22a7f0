"""Multi-rank losses on real gloo processes against the single-process loss of the global batch.

Gradient convention (what DDP / DeepSpeed need, since they average parameter gradients over ranks):
with L = (1/W) sum_r L_r the global loss and L_r the value rank r returns,
  - rank r's image and text gradients are sum_r' dL_r'/d(its rows) = W * dL/d(its rows),
  - the mean over ranks of the t' and b gradients is dL/dt', dL/db,
  - the mean over ranks of L_r is L.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from tests.helpers.distributed import run_ranks
from tests.helpers.loss_workers import (
    global_batch,
    loss_and_grads,
    misuse_worker,
    ring_cases_worker,
    subgroup_worker,
)
from training.losses import sigmoid_loss, softmax_loss

pytestmark = pytest.mark.distributed

CASES = [
    {"rows": 5, "dim": 3, "chunk": 2, "dtype": "float64"},  # tiles do not divide the local batch
    {"rows": 7, "dim": 16, "chunk": None, "dtype": "float64"},  # default tile
    {"rows": 1, "dim": 1, "chunk": 4, "dtype": "float64"},  # one pair per rank
    {
        "rows": 6,
        "dim": 8,
        "chunk": 4,
        "dtype": "float64",
        "scale": math.log(1e4),
        "bias": 1e3,
    },  # extreme t, b
    {"rows": 6, "dim": 8, "chunk": 4, "dtype": "float64", "txt_grad": False},  # no text gradients carried
    {"rows": 9, "dim": 32, "chunk": 4, "dtype": "float32"},
    {"rows": 5, "dim": 8, "chunk": None, "dtype": "float64", "loss": "softmax"},
]


def check_against_global(per_rank: list[dict], case: dict, world: int, seed: int = 0) -> None:
    """Compare the ranks' results with the single-process plain loss of the concatenated batch."""
    img, txt = global_batch(world, case["rows"], case["dim"], case["dtype"], seed)
    loss_fn = softmax_loss if case.get("loss") == "softmax" else sigmoid_loss
    ref = loss_and_grads(loss_fn, img, txt, case)  # plain path, one process
    tol = {"rtol": 1e-6, "atol": 1e-9} if case["dtype"] == "float64" else {}
    assert_close(torch.stack([r["loss"] for r in per_rank]).mean(), ref["loss"], **tol)
    assert_close(torch.cat([r["img"] for r in per_rank]), world * ref["img"], **tol)
    if case.get("txt_grad", True):
        assert_close(torch.cat([r["txt"] for r in per_rank]), world * ref["txt"], **tol)
    else:
        assert all(r["txt"] is None for r in per_rank)
    for name in ("scale", "bias"):
        assert_close(torch.stack([r[name] for r in per_rank]).mean(0), ref[name], **tol)


@pytest.mark.parametrize("world", [2, 4])
def test_ring_matches_global_batch(world):
    results = run_ranks(ring_cases_worker, world, CASES, timeout=120)
    for i, case in enumerate(CASES):
        check_against_global([results[rank][i] for rank in range(world)], case, world)


def test_ring_on_subgroups():
    case = {"rows": 3, "dim": 5, "chunk": 2, "dtype": "float64"}
    results = run_ranks(subgroup_worker, 4, case, timeout=120)
    check_against_global(results[:2], case, world=2, seed=0)
    check_against_global(results[2:], case, world=2, seed=1)


def test_ring_errors_name_the_problem():
    results = run_ranks(misuse_worker, 2, timeout=120)
    for messages in results:
        assert "local batch sizes differ across ranks: [8, 7]" in messages["unequal"]
        assert "grad_output" in messages["grad_output"]
        assert "min over ranks 1.0, max 2.0" in messages["grad_output"]
