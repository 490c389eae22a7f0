"""Training-step throughput and peak memory per rank for ZeRO stages 0-3 (2 CPU ranks by default).

Each (preset, stage) runs in fresh processes launched with torchrun; the step is the real one of
`vision-tower pretrain` (DeepSpeed engine, SiglipModel forward with the tiled multi-rank sigmoid
loss, backward, AdamW step) on synthetic batches, so data loading is not measured.

    python benchmarks/pretrain_step.py                          # tiny and b16_224, stages 0-3
    python benchmarks/pretrain_step.py --presets tiny --steps 20
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BATCH = {"tiny": 64, "b16_224": 4}


def worker(args: argparse.Namespace) -> None:
    import torch
    from training.engine import build_engine, init_distributed

    from training.config import load_config
    from training.pretrain import build_model, make_loss_fn

    rank, world = init_distributed()
    cfg = load_config(
        ROOT / "configs/pretrain/demo_tiny.yaml",
        [
            f"model.preset={args.preset}",
            "model.text={}",
            f"data.batch_size={args.batch}",
            f"run.deepspeed=configs/deepspeed/zero{args.stage}.json",
            "loss.chunk_size=256",
            "run.precision=fp32",
        ],
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    engine, _, _, _ = build_engine(model, cfg, world)
    loss_fn = make_loss_fn(cfg, world)
    size, vocab = model.config.vision.image_size, model.config.text.vocab_size
    length = model.config.text.max_position_embeddings
    pixels = torch.randn(args.batch, 3, size, size)
    ids = torch.randint(0, vocab, (args.batch, length))
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = engine(pixels, ids, loss_fn=loss_fn).loss
        engine.backward(loss)
        engine.step()
        torch.distributed.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stats = torch.tensor([peak_mib])
    gathered = [torch.zeros(1) for _ in range(world)]
    torch.distributed.all_gather(gathered, stats)
    if rank == 0:
        times.sort()
        median = times[len(times) // 2]
        print(
            "RESULT "
            + json.dumps(
                {
                    "preset": args.preset,
                    "stage": args.stage,
                    "world": world,
                    "global_batch": args.batch * world,
                    "step_s": median,
                    "images_per_s": args.batch * world / median,
                    "peak_rss_mib": [round(g.item()) for g in gathered],
                }
            ),
            flush=True,
        )


def launch(preset: str, stage: int, ranks: int, steps: int, warmup: int) -> dict:
    from training.launch import launch_env, torchrun_command

    target = [
        __file__,
        "--worker",
        "--preset",
        preset,
        "--stage",
        str(stage),
        "--batch",
        str(BATCH[preset]),
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
    ]
    out = subprocess.run(
        torchrun_command(ranks, target),
        env=launch_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{preset} zero{stage} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "b16_224"], choices=sorted(BATCH))
    parser.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 tiny, 3 b16_224)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"{args.ranks} CPU ranks (1 thread each), fp32, synthetic batches; median step of the timed steps")
    print(
        f"{'preset':8} {'stage':>5} {'global batch':>12} {'step s':>8} {'images/s':>9} {'peak RSS/rank MiB':>18}"
    )
    for preset in args.presets:
        steps = args.steps or (20 if preset == "tiny" else 3)
        for stage in args.stages:
            r = launch(preset, stage, args.ranks, steps, args.warmup)
            print(
                f"{preset:8} {stage:5d} {r['global_batch']:12d} {r['step_s']:8.3f} {r['images_per_s']:9.1f} "
                f"{'/'.join(map(str, r['peak_rss_mib'])):>18}",
                flush=True,
            )


if __name__ == "__main__":
    main()
