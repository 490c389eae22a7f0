"""Training precision: run.precision auto follows the machine (detection mocked both ways), bf16 runs
under autocast with fp32 weights, t', b and loss, and a real 2-rank ZeRO-2 bf16 run tracks fp32."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from training.runner.engine import deepspeed_config, training_precision
from training.runner.paths import ROOT
from training.tasks.siglip_config import load_config

DEMO = ROOT / "configs/pretrain/demo_tiny.yaml"


BF16_CPU, NO_BF16_CPU = "avx2 avx512f avx512_bf16", "avx2 avx512f"


@pytest.fixture
def cpu(cpu, monkeypatch):
    """The shared fake CPU (``conftest.py``), on a machine without CUDA: the choices here are the CPU's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return cpu


def _ds(*overrides: str) -> dict:
    cfg = load_config(
        DEMO, ["run.precision=auto", *overrides]
    )  # the demo pins fp32; these tests are about auto
    return deepspeed_config(cfg.optim, cfg.run, cfg.data.batch_size, 2)


def test_auto_is_bf16_autocast_where_the_cpu_has_it(cpu):
    cpu(BF16_CPU)
    ds = _ds()
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and ds["bf16"]["enabled"] is False
    p = training_precision(load_config(DEMO, ["run.precision=auto"]).run)
    assert p.mode == "bf16-autocast" and "avx512_bf16" in p.reason and p.input_dtype == torch.float32
    cpu(NO_BF16_CPU)
    ds = _ds()
    assert "torch_autocast" not in ds and ds["bf16"]["enabled"] is False
    p = training_precision(load_config(DEMO, ["run.precision=auto"]).run)
    assert p.mode == "fp32" and "no amx_bf16 or avx512_bf16" in p.reason
    assert p.record() == {"precision": "fp32", "precision_reason": p.reason}


def test_explicit_precision_wins_and_slow_bf16_warns(cpu):
    cpu(BF16_CPU)
    assert "torch_autocast" not in _ds("run.precision=fp32")
    cpu(NO_BF16_CPU)
    with pytest.warns(UserWarning, match="bfloat16 was requested but CPU has no amx_bf16"):
        ds = _ds("run.precision=bf16")
    assert ds["torch_autocast"]["enabled"] is True


def test_deepspeed_bf16_mode_only_from_the_json(cpu, tmp_path):
    cpu(NO_BF16_CPU)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = training_precision(load_config(DEMO, [f"run.deepspeed={path}", "run.precision=auto"]).run)
    assert p.mode == "bf16-deepspeed" and p.input_dtype == torch.bfloat16
    path.write_text(json.dumps({"torch_autocast": {"enabled": True}}))
    with pytest.raises(ValueError, match="remove torch_autocast, run.precision sets it"):
        _ds(f"run.deepspeed={path}")


@pytest.mark.distributed
def test_bf16_autocast_training_tracks_fp32_with_fp32_scalars_and_loss(tmp_path):
    """2 ranks, ZeRO-2, same init and batch: bf16 autocast runs its matmuls in bf16, keeps fp32 weights,
    t', b and loss, and its losses follow the fp32 run's. DeepSpeed's bf16 mode (from the JSON) trains too:
    bf16 weights, the batch cast to bf16 by the training step."""
    from tests.helpers.distributed import run_ranks
    from tests.helpers.precision_workers import precision_steps_worker

    ds_bf16 = tmp_path / "bf16.json"
    ds_bf16.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    runs = [
        ["run.precision=fp32"],
        ["run.precision=bf16"],
        ["run.precision=bf16", "loss.kind=softmax"],
        ["run.precision=auto", f"run.deepspeed={ds_bf16}"],
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without it warns, and is only slow
        fp32, bf16, softmax, ds_mode = run_ranks(
            precision_steps_worker, 2, runs, 4, backend=None, timeout=300
        )[0]
    assert ds_mode["precision"] == "bf16-deepspeed" and ds_mode["params"] == ["torch.bfloat16"]
    assert ds_mode["seen"]["mlp"] == "torch.bfloat16"
    assert (
        ds_mode["losses"] == pytest.approx(fp32["losses"], rel=5e-2)
        and ds_mode["losses"][-1] < ds_mode["losses"][0]
    )
    assert fp32["precision"] == "fp32" and fp32["seen"]["mlp"] == "torch.float32"
    assert bf16["precision"] == "bf16-autocast" and bf16["seen"]["mlp"] == "torch.bfloat16"
    for run in (fp32, bf16, softmax):
        assert run["params"] == ["torch.float32"]  # the weights are the fp32 master copy
        assert {run["seen"][k] for k in ("t", "b", "loss")} == {"torch.float32"}
        assert run["seen"]["loss_minus_fp32_loss"] == 0.0  # the loss itself never runs under autocast
    assert bf16["losses"][0] == pytest.approx(fp32["losses"][0], rel=1e-2)
    assert bf16["losses"] == pytest.approx(fp32["losses"], rel=1e-2)
    assert bf16["losses"][-1] < bf16["losses"][0]


@pytest.mark.slow
@pytest.mark.distributed
def test_compiled_blocks_train_like_eager():
    """run.compile: every transformer block runs compiled (2 ranks, ZeRO-2) and the losses equal eager's."""
    from tests.helpers.distributed import run_ranks
    from tests.helpers.precision_workers import precision_steps_worker

    runs = [["run.precision=fp32"], ["run.precision=fp32", "run.compile=true"]]
    eager, compiled = run_ranks(precision_steps_worker, 2, runs, 3, backend=None, timeout=600)[0]
    assert eager["compiled_blocks"] == eager["graphs"] == 0
    assert compiled["compiled_blocks"] == 4 and compiled["graphs"] >= 1  # 2 image + 2 text blocks
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5)
