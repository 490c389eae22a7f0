"""Training-step throughput and per-rank memory for ZeRO stages 0-3 (2 CPU ranks by default).

Each (preset, stage) runs in fresh processes launched with torchrun. The model, engine and step are
those of `vision-tower pretrain` (the SigLIP task built by the runner, at ZeRO-3 partitioned as it is
built; `training.runner.train_step`: precision cast, forward with the tiled multi-rank sigmoid loss,
backward, AdamW step) on synthetic batches, so data loading is not measured.

Memory per rank, two figures:
  params+optim  bytes of the tensors the rank holds for the model's parameters (its ZeRO-3 partition or
                the whole), the optimizer's master copies and its AdamW moments, counted from the tensors
                themselves (each storage once). Gradients and activations are not in it.
  step peak     the highest resident set size (RSS) sampled every millisecond during the timed steps,
                and in brackets its rise over the RSS just before them (activations, gradients,
                gathered ZeRO-3 parameters, communication buffers). RSS also holds the Python and
                library code, so compare it across stages rather than read it as model memory.

    python benchmarks/pretrain_step.py                          # tiny and b16_224, stages 0-3, fp32 and bf16
    python benchmarks/pretrain_step.py --presets b16_224 --stages 2 --precision fp32 bf16 --steps 5
    python benchmarks/pretrain_step.py --presets tiny --steps 20 --compile
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import threading
import time
from pathlib import Path

from worker_result import print_result, run_for_result  # beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BATCH = {"tiny": 64, "b16_224": 4}
MIB = 2**20


class RssSampler:
    """The peak resident set size of this process while the block runs, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.before = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def params_and_optimizer_bytes(engine) -> int:
    """Bytes of the parameters this rank holds, the optimizer's parameters (master copies) and its state."""
    import torch

    tensors = []
    for p in engine.engine.module.parameters():
        tensors.append(getattr(p, "ds_tensor", p.data))
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    for group in opt.param_groups:
        tensors += [p.data for p in group["params"]]
    for state in opt.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def worker(args: argparse.Namespace) -> None:
    import torch

    from training.runner import build_task_engine, init_distributed, train_step
    from training.tasks.siglip import SiglipTask
    from training.tasks.siglip_config import load_config

    rank, world = init_distributed()
    cfg = load_config(
        ROOT / "configs/pretrain/demo_tiny.yaml",
        [
            f"model.preset={args.preset}",
            "model.text={}",
            f"data.batch_size={args.batch}",
            f"run.deepspeed=configs/deepspeed/zero{args.stage}.json",
            "loss.chunk_size=256",
            f"run.precision={args.precision}",
            f"run.compile={'true' if args.compile else 'false'}",
        ],
    )
    task = SiglipTask(cfg)
    torch.manual_seed(0)
    engine, _ = build_task_engine(task, rank, world)
    model_cfg = engine.engine.module.config
    size, vocab = model_cfg.vision.image_size, model_cfg.text.vocab_size
    length = model_cfg.text.max_position_embeddings
    batch = {
        "pixel_values": torch.randn(args.batch, 3, size, size),
        "input_ids": torch.randint(0, vocab, (args.batch, length)),
    }
    batches = itertools.repeat(batch)
    for _ in range(args.warmup):
        train_step(engine, batches, task.loss)
    torch.distributed.barrier()
    times = []
    with RssSampler() as rss:
        for _ in range(args.steps):
            start = time.perf_counter()
            train_step(engine, batches, task.loss)
            torch.distributed.barrier()
            times.append(time.perf_counter() - start)
    mine = [params_and_optimizer_bytes(engine) / MIB, rss.peak / MIB, (rss.peak - rss.before) / MIB]
    gathered = [torch.zeros(3, dtype=torch.float64) for _ in range(world)]
    torch.distributed.all_gather(gathered, torch.tensor(mine, dtype=torch.float64))
    if rank == 0:
        times.sort()
        median = times[len(times) // 2]
        record = {
            "preset": args.preset,
            "stage": args.stage,
            "precision": engine.precision.mode,
            "world": world,
            "global_batch": args.batch * world,
            "step_s": median,
            "images_per_s": args.batch * world / median,
            "params_optim_mib": [round(g[0].item(), 2) for g in gathered],
            "step_peak_rss_mib": [round(g[1].item()) for g in gathered],
            "step_rise_mib": [round(g[2].item()) for g in gathered],
        }
        print_result(record)


def launch(
    preset: str, stage: int, ranks: int, steps: int, warmup: int, precision: str, compile: bool
) -> dict:
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
        "--precision",
        precision,
    ]
    target += ["--compile"] if compile else []
    return run_for_result(ranks, target, timeout=1800, what=f"{preset} zero{stage}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny", "b16_224"], choices=sorted(BATCH))
    parser.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 tiny, 3 b16_224)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=["fp32", "bf16"],
        default=["fp32", "bf16"],
        help="run.precision of each run; bf16 is autocast with fp32 weights (default: both)",
    )
    parser.add_argument("--compile", action="store_true", help="run.compile=true: torch.compile each block")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.precision = args.precision[0]
        worker(args)
        return
    from vision_tower.hardware import choose_precision

    print(
        f"{args.ranks} CPU ranks (1 thread each), synthetic batches, compile "
        f"{'on' if args.compile else 'off'}; "
        f"median step of the timed steps. This machine: {choose_precision('auto').describe()}\n"
        "params+optim: parameters, master copies and AdamW moments held per rank (from the tensors);\n"
        "step peak RSS: sampled every 1 ms during the timed steps, (rise over the RSS before them)"
    )
    print(
        f"{'preset':8} {'stage':>5} {'precision':>14} {'batch':>6} {'step s':>8} {'images/s':>9} "
        f"{'vs fp32':>7} "
        f"{'params+optim MiB/rank':>22} {'vs zero0':>8} {'step peak RSS MiB/rank (rise)':>30}"
    )
    for preset in args.presets:
        steps = args.steps or (20 if preset == "tiny" else 3)
        base = {}
        for stage in args.stages:
            fp32_rate = None
            for precision in args.precision:
                r = launch(preset, stage, args.ranks, steps, args.warmup, precision, args.compile)
                mem = r["params_optim_mib"]
                base.setdefault(precision, mem[0] if stage == 0 else None)
                ratio = f"{max(mem) / base[precision]:.2f}" if base[precision] else "-"
                fp32_rate = r["images_per_s"] if precision == "fp32" else fp32_rate
                speed = f"{r['images_per_s'] / fp32_rate:.2f}" if fp32_rate else "-"
                rss = " / ".join(f"{p} ({d:+d})" for p, d in zip(r["step_peak_rss_mib"], r["step_rise_mib"]))
                print(
                    f"{preset:8} {stage:5d} {r['precision']:>14} {r['global_batch']:6d} {r['step_s']:8.3f} "
                    f"{r['images_per_s']:9.1f} {speed:>7} {' / '.join(f'{m:.1f}' for m in mem):>22} "
                    f"{ratio:>8} "
                    f"{rss:>30}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
