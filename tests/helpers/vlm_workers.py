"""Rank workers for the VLM training tests (spawned by tests.helpers.distributed.run_ranks): both stages in
one process group, as `vision-tower train-vlm` runs them."""

from __future__ import annotations

import json
from pathlib import Path

from training.runner.paths import ROOT

CONFIGS = ROOT / "configs" / "vlm"


def losses(out: str) -> list[float]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and not r.get("final")]


def held_by_optimizer(task, rank: int, world: int) -> tuple[dict[str, float], bool]:
    """Build the task's model and engine with the runner's pieces; the parameters DeepSpeed's ZeRO
    optimizer holds, by name, with their group's learning rate, and whether at ZeRO-3 every decoder
    parameter (and the image layout's, ``image_newline``) was partitioned as the model was built (before
    ``deepspeed.initialize``)."""
    from training.runner import Zero, build_engine, deepspeed_config
    from training.runner.engine import zero_stage

    ds_config = deepspeed_config(task.optim, task.run, task.micro_batch_size, world)
    zero = Zero(zero_stage(ds_config), ds_config, rank, world)
    model = task.build_model(zero)
    parts = [*model.decoder.parameters(), *model.layout_params.parameters()]
    built_partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in parts)
    engine = build_engine(model, task.param_groups(model), task.optim, task.run, ds_config)
    opt = engine.engine.optimizer
    groups = getattr(opt, "bit16_groups", None) or opt.fp16_groups  # ZeRO-1/2, ZeRO-3
    names = {id(p): n for n, p in engine.engine.module.named_parameters()}
    held = {names[id(p)]: opt.optimizer.param_groups[i]["lr"] for i, g in enumerate(groups) for p in g}
    return held, built_partitioned


def stages_worker(
    rank: int, world: int, align: list[str], finetune: list[str], swap: list[str] | None = None
) -> dict:
    """Stage align, then stage finetune from its export, then (``swap`` given) ``swap_tower.yaml``: a new
    tower in a saved VLM, its connector aligned; per stage the losses, the final metrics and the
    parameters the optimizer holds (with their learning rates)."""
    from training.runner import init_distributed, train
    from training.tasks.vlm import VLMTask
    from training.tasks.vlm_config import load_vlm_config

    init_distributed()
    out = {}
    stages = [("align", "tiny_align.yaml", align), ("finetune", "tiny_finetune.yaml", finetune)]
    for name, path, overrides in stages + ([("swap", "swap_tower.yaml", swap)] if swap else []):
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


def answer_batch(vlm, samples: list[tuple[int, int]]) -> dict:
    """A hand-made training batch of the VLM builder's layout, one row per ``(seed, n)`` of ``samples``:
    image placeholders, bos and a 2-word prompt (the prefix, token type 0), then an answer of ``n`` words
    and eos (the suffix, 1), right-padded; random pixels. Words and pixels come from the row's seed, so a
    sample is the same in any batch. The loss counts ``n + 1`` tokens of the row."""
    import torch

    image, bos, eos, pad = vlm.image_token_id, 1, 2, 0
    vocab = vlm.decoder.get_input_embeddings().num_embeddings
    words = torch.tensor([i for i in range(4, vocab) if i != image])
    size = vlm.tower.config.image_size
    rows, types, pixels = [], [], []
    for seed, n in samples:
        g = torch.Generator().manual_seed(seed)
        draw = words[torch.randint(len(words), (2 + n,), generator=g)].tolist()
        prefix = [image] * vlm.num_image_tokens + [bos, *draw[:2]]
        rows.append(prefix + draw[2:] + [eos])
        types.append([0] * len(prefix) + [1] * (n + 1))
        pixels.append(torch.randn((3, size, size), generator=g))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    token_types, mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (row, kinds) in enumerate(zip(rows, types, strict=True)):
        ids[i, : len(row)], token_types[i, : len(row)] = torch.tensor(row), torch.tensor(kinds)
        mask[i, : len(row)] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": token_types,
        "labels": ids.clone(),
        "pixel_values": torch.stack(pixels),
    }


def one_step_grads_worker(rank: int, world: int, cases: list[tuple[list[str], list]]) -> list[dict]:
    """Per case ``(overrides, shares)``: one optimizer step of the VLM task (``tiny_align.yaml`` with the
    overrides) through the runner's ``train_step`` on hand-made batches, rank r taking the micro-batches
    ``shares[r]`` (one list of ``(seed, answer words)`` samples per accumulation step, see
    :func:`answer_batch`). Returns per case the logged loss and the gradients of the trainable parameters
    as DeepSpeed holds them at the accumulation boundary (averaged over ranks, before the optimizer step;
    ZeRO stage 0)."""
    import torch

    from training.runner import build_task_engine, init_distributed, train_step
    from training.runner.metrics import mean_over_ranks
    from training.tasks.vlm import VLMTask
    from training.tasks.vlm_config import load_vlm_config

    init_distributed()
    out = []
    for overrides, shares in cases:
        torch.manual_seed(0)
        task = VLMTask(load_vlm_config(CONFIGS / "tiny_align.yaml", overrides))
        engine, _ = build_task_engine(task, rank, world)
        ds, grads = engine.engine, {}
        real_step = ds.step

        def step(*args, ds=ds, grads=grads, real_step=real_step, **kwargs):
            if ds.is_gradient_accumulation_boundary():
                grads.update(
                    {n: p.grad.detach().clone() for n, p in ds.module.named_parameters() if p.requires_grad}
                )
            return real_step(*args, **kwargs)

        ds.step = step
        batches = iter([answer_batch(task.vlm, samples) for samples in shares[rank]])
        result = train_step(engine, batches, task.loss, task.loss_items)
        out.append({"loss": mean_over_ranks(result.loss), "grads": grads})
    return out


def built_batches_worker(
    rank: int, world: int, config: str, cases: list[tuple[list[str], list]]
) -> list[list[float]]:
    """Per case ``(overrides, shares)``: the VLM task of ``config`` (a file under configs/vlm) with the
    overrides, built by the runner; rank r trains one step per micro-batch of ``shares[r]`` (raw samples,
    made into a batch by the task's own builder, as its loader does). Returns per case the logged loss of
    each step (the mean over every rank's answer tokens)."""
    import torch

    from training.runner import build_task_engine, init_distributed, train_step
    from training.runner.metrics import mean_over_ranks
    from training.tasks.vlm import VLMTask
    from training.tasks.vlm_config import load_vlm_config

    init_distributed()
    out = []
    for overrides, shares in cases:
        torch.manual_seed(0)
        task = VLMTask(load_vlm_config(CONFIGS / config, overrides))
        engine, _ = build_task_engine(task, rank, world)
        builder = task.builder()
        steps = []
        for samples in shares[rank]:
            batch = builder.collate([builder.build(s) for s in samples])
            steps.append(mean_over_ranks(train_step(engine, iter([batch]), task.loss, task.loss_items).loss))
        out.append(steps)
    return out
