"""Rank workers for the VLM training tests (spawned by tests.distributed_utils.run_ranks): both stages in
one process group, as `vision-tower train-vlm` runs them."""

from __future__ import annotations

import json
from pathlib import Path

from training.config import ROOT

CONFIGS = ROOT / "configs" / "vlm"


def losses(out: str) -> list[float]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and not r.get("final")]


def held_by_optimizer(task, rank: int, world: int) -> tuple[dict[str, float], bool]:
    """Build the task's model and engine with the runner's pieces; the parameters DeepSpeed's ZeRO
    optimizer holds, by name, with their group's learning rate, and whether at ZeRO-3 every decoder
    parameter was partitioned as the model was built (before ``deepspeed.initialize``)."""
    from training.runner import Zero, build_engine, deepspeed_config
    from training.runner.engine import zero_stage

    ds_config = deepspeed_config(task.optim, task.run, task.micro_batch_size, world)
    zero = Zero(zero_stage(ds_config), ds_config, rank, world)
    model = task.build_model(zero)
    built_partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.decoder.parameters())
    engine = build_engine(model, task.param_groups(model), task.optim, task.run, ds_config)
    opt = engine.engine.optimizer
    groups = getattr(opt, "bit16_groups", None) or opt.fp16_groups  # ZeRO-1/2, ZeRO-3
    names = {id(p): n for n, p in engine.engine.module.named_parameters()}
    held = {names[id(p)]: opt.optimizer.param_groups[i]["lr"] for i, g in enumerate(groups) for p in g}
    return held, built_partitioned


def stages_worker(rank: int, world: int, align: list[str], finetune: list[str]) -> dict:
    """Stage align, then stage finetune from its export; per stage the losses, the final metrics and the
    parameters the optimizer holds (with their learning rates)."""
    from training.runner import init_distributed, train
    from training.tasks.vlm import VLMTask
    from training.tasks.vlm_config import load_vlm_config

    init_distributed()
    out = {}
    for name, path, overrides in (
        ("align", "tiny_align.yaml", align),
        ("finetune", "tiny_finetune.yaml", finetune),
    ):
        cfg = load_vlm_config(CONFIGS / path, overrides)
        held, partitioned = held_by_optimizer(VLMTask(cfg), rank, world)
        final = train(VLMTask(cfg))
        out[name] = {
            "losses": losses(cfg.run.out_dir),
            "final": final,
            "held": held,
            "partitioned": partitioned,
        }
    return out
