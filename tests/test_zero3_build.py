"""At ZeRO-3 the SigLIP model is built partitioned (no rank holds it whole) with the same weights as
the plain build: the same random init from a preset, the `model.init_from` weights from a checkpoint."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_ranks
from tests.helpers.pretrain_workers import zero3_build_worker
from training.runner.paths import ROOT
from training.tasks.siglip import build_model
from training.tasks.siglip_config import load_config
from vision_tower import SiglipModel

pytestmark = pytest.mark.distributed


def _plain(overrides: list[str]) -> dict[str, torch.Tensor]:
    cfg = load_config(ROOT / "configs/pretrain/demo_tiny.yaml", ["data.train_shards=unused", *overrides])
    torch.manual_seed(cfg.run.seed)
    return build_model(cfg).state_dict()


def _check(results: list[dict], expected: dict[str, torch.Tensor]) -> None:
    total = results[0]["total"]
    assert total == sum(v.numel() for v in expected.values())
    for r in results:  # each rank holds its half (padded to the rank count), never the whole model
        assert r["held"] <= total / 2 + 2 * len(expected), (r["held"], total)
        assert set(r["state"]) == set(expected)
        for name, value in expected.items():
            assert torch.equal(r["state"][name], value), name


def test_preset_built_partitioned_equals_the_plain_build():
    overrides = ["data.image_size=48"]  # the position table is resized before partitioning
    results = run_ranks(zero3_build_worker, 2, overrides, backend=None, timeout=120)
    _check(results, _plain(overrides))


def test_init_from_weights_load_into_the_partitioned_model(tmp_path):
    torch.manual_seed(123)
    source = SiglipModel.from_preset("tiny")
    with torch.no_grad():
        source.logit_scale.fill_(1.5)
        source.logit_bias.fill_(-3.0)
    source.save_pretrained(tmp_path / "siglip")
    overrides = [f"model.init_from={tmp_path / 'siglip'}", "model.preset=null", "model.text={}"]
    results = run_ranks(zero3_build_worker, 2, overrides, backend=None, timeout=120)
    _check(results, source.state_dict())
