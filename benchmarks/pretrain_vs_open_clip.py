"""One SigLIP pretraining step at B/16-224: ours (the step `vision-tower pretrain` runs: the SigLIP task
built by the runner at ZeRO-0 in one process, `training.runner.train_step` with the tiled sigmoid loss,
gradient clipping and AdamW) against open_clip's ``ViT-B-16-SigLIP`` with its ``SigLipLoss``, the same
clipping and ``torch.optim.AdamW``.

Both start from the same weights (open_clip's random initialisation, read by ours through the open_clip
layout, so ours uses open_clip's exact GELU) and take the same batch of random pixels and token ids (written
once, read by both); their first losses must agree. Each side runs in a fresh process of its own (in one
process the two models' allocations interleave and slow each other down), in the precision `auto` picks on
the device (bf16 on CUDA from Ampere and on CPUs with native bf16 matmul, else fp32): a warm-up, then the
median of ``--steps`` timed steps, and the process's peak memory (CPU: peak RSS; CUDA: the most allocated).

On CPU the runner makes glibc's malloc keep freed memory for the next step
(:func:`vision_tower.hardware.keep_freed_cpu_memory`); open_clip runs twice, as it comes and with that same
setting, so the table shows how much of the difference is the allocator and how much the model code. A
breakdown of our step (forward, backward, optimizer) says where the time goes.

    python benchmarks/pretrain_vs_open_clip.py                 # batch 8, 3 timed steps each, CPU
    python benchmarks/pretrain_vs_open_clip.py --batch 16 --steps 5
    python benchmarks/pretrain_vs_open_clip.py --device cuda --batch 256 --steps 10 --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIDES = {
    "ours": "ours (vision-tower pretrain step)",
    "open_clip": "open_clip ViT-B-16-SigLIP + SigLipLoss",
    "open_clip_kept": "open_clip, malloc keeping freed memory",
}


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


def write_batch(path: Path, batch: int) -> None:
    """Random pixels and token ids at the model's shapes (224 px, 64 tokens of a 32k vocabulary)."""
    import open_clip
    from safetensors.torch import save_file

    text = open_clip.get_model_config("ViT-B-16-SigLIP")["text_cfg"]
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, 224, 224, generator=gen)
    ids = torch.randint(0, text["vocab_size"], (batch, text["context_length"]), generator=gen)
    save_file({"pixel_values": pixels, "input_ids": ids}, path)


def task_for(folder: Path, batch: int):
    """The SigLIP task `vision-tower pretrain` would run on the open_clip folder (ZeRO-0, precision auto)."""
    from training.tasks.siglip import SiglipTask
    from training.tasks.siglip_config import load_config

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
    return SiglipTask(cfg)


def ours(task):
    """The runner's engine for ``task`` in this process (a one-rank process group)."""
    from training.runner import build_task_engine, init_distributed

    rank, world = init_distributed()
    engine, _ = build_task_engine(task, rank, world)
    return engine


def theirs(folder: Path, lr: float, weight_decay: float, device: torch.device):
    import open_clip
    from safetensors.torch import load_file

    model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None)
    model.load_state_dict(load_file(folder / "open_clip_model.safetensors"))
    model.to(device).train()
    loss = open_clip.loss.SigLipLoss()
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return model, loss, optim


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def child(side: str, folder: str, batch_file: str, steps: int, warmup: int) -> dict:
    """One side's steps in this process: first loss, step times, peak memory (and ours' breakdown)."""
    from safetensors.torch import load_file

    from training.runner import train_step
    from training.runner.engine import training_precision
    from training.runner.loop import prepare_batch
    from vision_tower.hardware import keep_freed_cpu_memory

    batch = load_file(batch_file)
    task = task_for(Path(folder), len(batch["input_ids"]))
    precision = training_precision(task.run)  # what the runner resolves: the same for both sides
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the runner's device
    result = {"side": side, "precision": precision.mode, "allocator": ""}
    if side == "ours":
        engine = ours(task)
        result["allocator"] = engine.allocator
        batches = itertools.repeat(batch)

        def step() -> float:
            return float(train_step(engine, batches, task.loss).loss)
    else:
        if side == "open_clip_kept":
            result["allocator"] = keep_freed_cpu_memory()
        model, siglip_loss, optim = theirs(Path(folder), task.optim.lr, task.optim.weight_decay, device)
        on = {k: v.to(device) for k, v in batch.items()}
        autocast = precision.mode == "bf16-autocast"  # ours' forward runs under bf16 autocast then

        def step() -> float:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                image, text, scale, bias = model(on["pixel_values"], on["input_ids"])
            loss = siglip_loss(image.float(), text.float(), scale.float(), bias.float())  # as ours: fp32 loss
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), task.optim.grad_clip)
            optim.step()
            return float(loss.detach())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    result["first_loss"] = step()
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    result.update(step_s=statistics.median(times), times=times, peak_gib=_peak_gib(device))
    if side == "ours":  # where our step's time goes: forward (with the loss), backward, optimizer step
        ds = engine.engine
        parts = {"forward + loss": [], "backward": [], "optimizer": []}
        for _ in range(steps):
            sync()
            start = time.perf_counter()
            loss = task.loss(ds, prepare_batch(batch, engine.dtype, ds.device))
            sync()
            parts["forward + loss"].append(time.perf_counter() - start)
            start = time.perf_counter()
            ds.backward(loss)
            sync()
            parts["backward"].append(time.perf_counter() - start)
            start = time.perf_counter()
            ds.step()
            sync()
            parts["optimizer"].append(time.perf_counter() - start)
        result["parts_s"] = {k: statistics.median(v) for k, v in parts.items()}
        result["parameters"] = sum(p.numel() for p in ds.module.parameters())
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="default: cuda where there is one (the runner's)",
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    from vision_tower.hardware import choose_precision

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    # the runner trains on a GPU whenever it sees one: hide it for a CPU run
    env = None if device == "cuda" else {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    from benchmarks.tower_forward import cpu_model

    where = torch.cuda.get_device_name() if device == "cuda" else cpu_model()
    print(f"{where}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(choose_precision("auto", device).describe())
    results = []
    with tempfile.TemporaryDirectory(prefix="pretrain_vs_open_clip_") as tmp:
        folder, batch_file = Path(tmp) / "oc", Path(tmp) / "batch.safetensors"
        open_clip_folder(folder)
        write_batch(batch_file, args.batch)
        sides = ["ours", "open_clip"] + ["open_clip_kept"] * (device == "cpu")
        for side in sides:
            spec = json.dumps([side, str(folder), str(batch_file), args.steps, args.warmup])
            proc = subprocess.run(
                [sys.executable, __file__, "--child", spec], capture_output=True, text=True, env=env
            )
            if proc.returncode:
                raise SystemExit(f"{side} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = results[1]["step_s"]
    print(f"\nB/16-224 (text 64 tokens), batch {args.batch}, one process each, {results[0]['precision']}")
    if results[0]["allocator"]:
        print(results[0]["allocator"])
    for r in results:
        print(
            f"  {SIDES[r['side']]:42s} step {r['step_s'] * 1e3:9.1f} ms "
            f"({r['step_s'] / base:.2f}x open_clip)  peak {r['peak_gib']:.2f} GiB  "
            f"first loss {r['first_loss']:.6f}"
        )
    parts = results[0]["parts_s"]
    total = sum(parts.values())
    print(
        "  ours, where the time goes: "
        + ", ".join(f"{k} {v / total:.0%}" for k, v in parts.items())
        + f" (of {total * 1e3:.0f} ms; {results[0]['parameters'] / 1e6:.0f}M parameters)"
    )
    if args.json:
        args.json.write_text(json.dumps({"device": where, "batch": args.batch, "results": results}, indent=1))


if __name__ == "__main__":
    main()
