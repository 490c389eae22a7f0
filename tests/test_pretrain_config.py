"""Run configs: every YAML and DeepSpeed JSON in configs/ loads and validates; bad keys are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.runner.engine import deepspeed_config, lr_factor, param_groups
from training.runner.paths import ROOT
from training.tasks.siglip_config import load_config
from vision_tower import SiglipModel


def _ds(cfg, world: int) -> dict:
    """The DeepSpeed config a run of ``cfg`` on ``world`` ranks gets (from its optim and run sections)."""
    return deepspeed_config(cfg.optim, cfg.run, cfg.data.batch_size, world)


YAMLS = sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))
JSONS = sorted((ROOT / "configs" / "deepspeed").glob("*.json"))


def test_configs_exist():
    assert {p.name for p in YAMLS} >= {
        "demo_tiny.yaml",
        "b16_224_scratch.yaml",
        "so400m_finetune.yaml",
        "siglit_b16.yaml",
    }
    assert {p.name for p in JSONS} == {"zero0.json", "zero1.json", "zero2.json", "zero3.json"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_run_config_loads_and_its_deepspeed_config_resolves(path):
    cfg = load_config(path)
    ds = _ds(cfg, 4)
    assert ds["train_batch_size"] == cfg.data.batch_size * cfg.optim.grad_accum * 4
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    assert ds["zero_optimization"]["stage"] in (0, 1, 2, 3)


def test_a_shipped_config_is_found_from_any_folder(tmp_path, monkeypatch):
    """`pretrain --config configs/pretrain/...` as the README writes it, run outside the checkout."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/pretrain/demo_tiny.yaml")
    assert cfg == load_config(ROOT / "configs" / "pretrain" / "demo_tiny.yaml")


def test_the_pretrain_command_finds_a_shipped_config_from_any_folder(tmp_path, monkeypatch, capsys):
    """As train-vlm finds configs/vlm/...: the run goes on to its data (missing here), not "no config"."""
    from vision_tower.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["--config", "configs/pretrain/demo_tiny.yaml", f"data.train_shards={tmp_path / 'x.tar'}"]
    for command in ("pretrain", "train-vlm"):
        config = args[1] if command == "pretrain" else "configs/vlm/tiny_align.yaml"
        assert main([command, "--config", config, *args[2:]]) == 2
        assert capsys.readouterr().err.strip() == (
            f"vision-tower {command}: error: data.train_shards: none of the 1 shards exist, e.g. "
            f"'{tmp_path / 'x.tar'}' (from '{tmp_path / 'x.tar'}')"
        )


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.name)
def test_every_deepspeed_json_fills_in(path):
    cfg = load_config(ROOT / "configs/pretrain/demo_tiny.yaml", [f"run.deepspeed={path}"])
    ds = _ds(cfg, 2)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size
    assert json.loads(path.read_text())["zero_optimization"]["stage"] == int(path.stem[-1])


def test_unknown_keys_are_named():
    demo = ROOT / "configs/pretrain/demo_tiny.yaml"
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lr_max'\] in optim"):
        load_config(demo, ["optim.lr_max=3"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['modle'\] in config"):
        load_config(demo, ["modle.preset=tiny"])


def test_overrides_and_validation(tmp_path: Path):
    demo = ROOT / "configs/pretrain/demo_tiny.yaml"
    cfg = load_config(demo, ["run.steps=7", "optim.betas=[0.8, 0.9]", "model.text.vocab_size=300"])
    assert cfg.run.steps == 7 and cfg.optim.betas == (0.8, 0.9) and cfg.model.text == {"vocab_size": 300}
    with pytest.raises(ValueError, match="exactly one of 'preset'"):
        load_config(demo, ["model.init_from=some/repo"])
    with pytest.raises(ValueError, match="loss.kind"):
        load_config(demo, ["loss.kind=hinge"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(demo, ["run.steps"])
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=3"):
        _ds(load_config(demo, [f"run.deepspeed={bad}"]), 1)


def test_weight_decay_groups_exclude_norms_biases_positions_and_t_b():
    model = SiglipModel.from_preset("tiny")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no = {names[id(p)] for p in no_decay["params"]}
    yes = {names[id(p)] for p in decay["params"]}
    assert {
        "logit_scale",
        "logit_bias",
        "vision.pos_embed",
        "text.pos_embed",
        "vision.head.probe",
        "vision.norm.weight",
        "vision.encoder.blocks.0.attn.qkv.bias",
    } <= no
    assert "vision.encoder.blocks.0.attn.qkv.weight" in yes and "text.token_embed.weight" in yes
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    model.vision.requires_grad_(False)
    frozen = param_groups(model, 0.1)
    assert not any(names[id(p)].startswith("vision.") for g in frozen for p in g["params"])


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, warmup=10, total=110, min_ratio=0.1) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_numbers_written_without_a_dot_are_numbers():
    cfg = load_config(ROOT / "configs/pretrain/demo_tiny.yaml", ["optim.lr=1e-3", "run.steps=5"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float) and cfg.run.steps == 5
    with pytest.raises(ValueError, match=r"optim.lr: expected a number, got 'fast'"):
        load_config(ROOT / "configs/pretrain/demo_tiny.yaml", ["optim.lr=fast"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("run.log_every=0", "log_every"),
        ("optim.grad_accum=0", "grad_accum"),
        ("optim.betas=0.9", r"optim.betas: expected 2 values"),
        ("model.preset=b99", "unknown preset 'b99'"),
        ("model.vision.hidden_sise=3", "unknown key.*hidden_sise"),
        ("run.steps=2.7", r"run.steps: expected an integer, got 2.7"),
        ("run.steps=true", r"run.steps: expected an integer, got True"),
        ("run.save_every=-1", r"run.save_every must be >= 0, got -1"),
        ("run.max_bad_steps=0", r"run.max_bad_steps must be >= 1, got 0"),
        ("optim.weight_decay=-0.1", r"optim.weight_decay must be >= 0, got -0.1"),
        ("optim.grad_clip=-1", r"optim.grad_clip must be >= 0, got -1"),
        ("optim.min_lr_ratio=1.5", r"optim.min_lr_ratio must be <= 1, got 1.5"),
        ("optim.lr=0", r"optim.lr must be > 0"),
        ("optim.betas=[0.9, 1.0]", r"optim.betas\[1\] must be in \[0, 1\)"),
        ("loss.chunk_size=0", r"loss.chunk_size must be >= 1, got 0"),
        ("data.batch_size=-1", r"data.batch_size must be >= 1, got -1"),
        ("model.lock_image=1", r"model.lock_image: expected true or false, got 1"),
        ("run.out_dir=[a]", r"run.out_dir: expected a string"),
    ],
)
def test_bad_values_are_refused_when_the_config_loads(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(ROOT / "configs/pretrain/demo_tiny.yaml", [override])


def test_precision_in_the_json_must_agree_with_the_run(tmp_path: Path):
    demo = ROOT / "configs/pretrain/demo_tiny.yaml"
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ValueError, match="bf16.enabled=True but run.precision=fp32"):
        _ds(load_config(demo, [f"run.deepspeed={ds}", "run.precision=fp32"]), 1)
    assert _ds(load_config(demo, [f"run.deepspeed={ds}", "run.precision=auto"]), 1)["bf16"]["enabled"] is True
