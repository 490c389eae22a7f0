"""One SigLIP pretraining step at B/16-224: ours (the step `vision-tower pretrain` runs: the SigLIP task
built by the runner at ZeRO-0 in one process, `training.runner.train_step` with the tiled sigmoid loss,
gradient clipping and AdamW) against open_clip's ``ViT-B-16-SigLIP`` with its ``SigLipLoss``, the same
clipping and ``torch.optim.AdamW``, side by side in one process.

Both start from the same weights (open_clip's random initialisation, read by ours through the open_clip
layout, so ours uses open_clip's exact GELU) and take the same batch of random pixels and token ids; their
first losses must agree. The steps are timed alternately after a warm-up (the median is reported) in the
precision `auto` picks on this machine (bf16 on CPUs with native bf16 matmul, else fp32); a breakdown of
our step (forward, backward, optimizer) says where the time goes.

    python benchmarks/pretrain_vs_open_clip.py                 # batch 8, 3 timed steps each
    python benchmarks/pretrain_vs_open_clip.py --batch 16 --steps 5
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def open_clip_folder(folder: Path) -> None:
    """A random ``ViT-B-16-SigLIP`` saved in open_clip's layout (what our loader reads)."""
    import open_clip
    from safetensors.torch import save_file

    model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None)
    cfg = open_clip.get_model_config("ViT-B-16-SigLIP")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors"
    )


def ours(folder: Path, batch: int):
    from training.runner import build_task_engine, init_distributed
    from training.tasks.siglip import SiglipTask
    from training.tasks.siglip_config import load_config

    rank, world = init_distributed()
    cfg = load_config(
        ROOT / "configs/pretrain/demo_tiny.yaml",
        [
            "model.preset=null",
            "model.text={}",
            f"model.init_from={folder}",
            f"data.batch_size={batch}",
            "run.deepspeed=configs/deepspeed/zero0.json",
            "run.precision=auto",
            "optim.warmup_steps=0",
        ],
    )
    task = SiglipTask(cfg)
    engine, _ = build_task_engine(task, rank, world)
    return task, engine


def theirs(folder: Path, lr: float, weight_decay: float):
    import open_clip
    from safetensors.torch import load_file

    model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None)
    model.load_state_dict(load_file(folder / "open_clip_model.safetensors"))
    model.train()
    loss = open_clip.loss.SigLipLoss()
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return model, loss, optim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()

    from training.runner import train_step
    from training.runner.loop import prepare_batch
    from vision_tower.hardware import choose_precision

    precision = choose_precision("auto")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {precision.describe()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "oc"
        open_clip_folder(folder)
        task, engine = ours(folder, args.batch)
        model, siglip_loss, optim = theirs(folder, task.optim.lr, task.optim.weight_decay)
    cfg = engine.engine.module.config
    torch.manual_seed(0)
    batch = {
        "pixel_values": torch.randn(args.batch, 3, cfg.vision.image_size, cfg.vision.image_size),
        "input_ids": torch.randint(0, cfg.text.vocab_size, (args.batch, cfg.text.max_position_embeddings)),
    }
    batches = itertools.repeat(batch)
    dtype = engine.dtype

    def open_clip_step() -> float:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            image, text, scale, bias = model(batch["pixel_values"], batch["input_ids"])
            loss = siglip_loss(image, text, scale, bias)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), task.optim.grad_clip)
        optim.step()
        return float(loss)

    def ours_step() -> float:
        return float(train_step(engine, batches, task.loss).loss)

    steps = {
        "ours (vision-tower pretrain step)": ours_step,
        "open_clip ViT-B-16-SigLIP + SigLipLoss": open_clip_step,
    }
    first = {name: step() for name, step in steps.items()}  # the same weights: the same first loss
    for _ in range(args.warmup - 1):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["open_clip ViT-B-16-SigLIP + SigLipLoss"])
    print(f"\nB/16-224 (text 64 tokens), batch {args.batch}, one process, {engine.precision.mode}")
    for name in steps:
        t = statistics.median(times[name])
        print(
            f"  {name:42s} step {t * 1e3:9.1f} ms ({t / base:.2f}x open_clip)  first loss {first[name]:.6f}"
        )
    # where our step's time goes: forward (with the loss), backward, optimizer step
    module = engine.engine.module
    parts = {"forward + loss": [], "backward": [], "optimizer": []}
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = task.loss(engine.engine, prepare_batch(batch, engine.dtype, engine.engine.device))
        parts["forward + loss"].append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.engine.backward(loss)
        parts["backward"].append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.engine.step()
        parts["optimizer"].append(time.perf_counter() - start)
    total = sum(statistics.median(v) for v in parts.values())
    print(
        "  ours, where the time goes: "
        + ", ".join(f"{k} {statistics.median(v) / total:.0%}" for k, v in parts.items())
        + f" (of {total * 1e3:.0f} ms; {sum(p.numel() for p in module.parameters()) / 1e6:.0f}M parameters)"
    )


if __name__ == "__main__":
    main()
