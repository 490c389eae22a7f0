"""Rank workers for the training-precision tests (spawned by tests.helpers.distributed.run_ranks)."""

from __future__ import annotations

import itertools

import torch


def precision_steps_worker(rank: int, world: int, runs: list[list[str]], steps: int) -> list[dict]:
    """For each list of config overrides in ``runs``: the SigLIP task's ZeRO-2 engine built from seed 0, then
    ``steps`` training steps on a fixed batch. Returns per run the global losses, the run's precision
    record, the dtypes seen inside the forward (an MLP's output, t', b and the loss) and held by the
    parameters, and how far the first loss is from the same loss computed outside autocast."""
    from tests.helpers.pretrain_workers import siglip_engine
    from training.runner import init_distributed, mean_over_ranks, train_step
    from training.tasks.siglip import make_loss_fn

    init_distributed()
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(4 * world, 3, 32, 32, generator=gen)[rank * 4 : (rank + 1) * 4]
    ids = torch.randint(0, 128, (4 * world, 16), generator=gen)[rank * 4 : (rank + 1) * 4]
    results = []
    for overrides in runs:
        base = ["data.batch_size=4", "optim.warmup_steps=0", "optim.lr=1e-3"]
        base.append("run.deepspeed=configs/deepspeed/zero2.json")
        task, engine, _ = siglip_engine([*base, *overrides], world)
        seen: dict[str, str] = {}
        module = engine.engine.module

        def hook(module, inputs, out, seen=seen) -> None:
            seen.setdefault("mlp", str(out.dtype))

        module.vision.encoder.blocks[0].mlp.fc1.register_forward_hook(hook)
        loss_fn = make_loss_fn(task.cfg, world)

        def watched(img, txt, t, b, loss_fn=loss_fn, seen=seen):
            loss = loss_fn(img, txt, t, b)
            with torch.no_grad(), torch.autocast(img.device.type, enabled=False):
                fp32 = loss_fn(img.float(), txt.float(), t.float(), b.float())  # collective, as the loss
            seen.update(t=str(t.dtype), b=str(b.dtype), loss=str(loss.dtype))
            seen.setdefault("loss_minus_fp32_loss", (loss - fp32).abs().item())
            return loss

        task._loss_fn = watched
        batches = itertools.repeat({"pixel_values": pixels, "input_ids": ids})
        losses = [mean_over_ranks(train_step(engine, batches, task.loss).loss) for _ in range(steps)]
        params = sorted({str(p.dtype) for p in module.parameters()})
        device = str(next(module.parameters()).device)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # compiled so far in this process
        results.append(
            {
                "losses": losses,
                "seen": seen,
                "params": params,
                "device": device,
                "graphs": graphs,
                **engine.record(),
            }
        )
    return results
