"""Stage-align training steps per second with and without the feature cache, side by side.

Stage align trains only the connector: the tower is frozen, so its patch features of a sample never
change. Without a cache every step decodes and preprocesses the images and runs the tower; with
``data.feature_cache`` (``vision-tower extract --shards``) the step reads the features instead. Both
settings run the step `vision-tower train-vlm` runs (`training.runner.train_step` on the VLM task's
engine and loader, data loading included) in fresh processes, with a random-weight tower of a
registered shape (default ``so400m_p14_384``, 729 tokens per 384 px image), the ``linear`` connector and
a tiny random decoder (``tiny_gemma``: 2 layers, width 64) on coloured-shapes shards drawn at the tower's
resolution. The one-time cost of writing the cache is printed beside. ``--image-layout anyres`` (or any
registered layout) cuts each image into that layout's crops, in both settings: the cache then holds every
crop's features (``vision-tower extract --shards --image-layout anyres``).

    python benchmarks/align_step.py                                  # so400m_p14_384, batch 8, 10 steps
    python benchmarks/align_step.py --tower tiny --steps 3 --batch 2 # a smoke run in seconds
    python benchmarks/align_step.py --image-layout anyres            # LLaVA-NeXT's tiles: 3 crops an image
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from worker_result import print_result, run_for_result  # beside this script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SEED = 0


def tower(name: str):
    """The random tower every process builds alike (seeded, no pooling head)."""
    import torch

    from vision_tower.sources import load_tower

    torch.manual_seed(SEED)
    return load_tower(f"preset:{name}", use_head=False)


def prepare(args: argparse.Namespace, root: Path) -> dict:
    """Shards at the tower's resolution, a word tokenizer of their captions, and the feature cache."""
    from training.data.feature_cache import cache_identity, extract_shards, tower_layout
    from training.demo import caption_corpus
    from training.demo.decoders import word_tokenizer
    from training.demo.shapes import make_shapes
    from vision_tower import ImageProcessor

    t = tower(args.tower)
    size = t.config.image_size
    make_shapes(
        root / "data",
        n_train=args.samples,
        n_val=1,
        shard_size=max(1, args.samples // 4),
        image_size=size,
        zeroshot_per_class=1,
    )
    word_tokenizer(caption_corpus()).save_pretrained(root / "tokenizer")
    processor = ImageProcessor(image_size=size)
    layout = tower_layout(t, args.image_layout)  # the linear connector keeps the tower's tokens per crop
    identity = cache_identity(t, processor, layout)
    start = time.perf_counter()
    summary = extract_shards(
        t,
        processor,
        root / "data" / "train",
        root / "cache",
        layout=layout,
        identity=identity,
        batch_size=args.batch,
        progress=False,
    )
    return {
        "extract_s": time.perf_counter() - start,
        "samples": summary.samples,
        "crops": summary.crops,
        "tokens": layout.num_tokens((size, size)),  # decoder tokens of one (square) image
    }


def worker(args: argparse.Namespace) -> None:
    import torch

    from training.runner import build_task_engine, init_distributed, train_step
    from training.tasks.vlm import VLMTask
    from training.tasks.vlm_config import load_vlm_config

    rank, world = init_distributed()
    root = Path(args.root)
    overrides = [
        f"model.tower=preset:{args.tower}",
        f"model.decoder=preset:{args.decoder}",
        f"model.tokenizer={root / 'tokenizer'}",
        f"data.train_shards={root / 'data' / 'train'}",
        "data.val_shards=null",
        f"data.batch_size={args.batch}",
        f"data.num_workers={args.num_workers}",
        f"data.max_length={args.tokens + 40}",
        f"run.precision={args.precision}",
        f"run.deepspeed=configs/deepspeed/zero{args.zero}.json",
        f"run.out_dir={root / 'unused'}",
        f"model.image_layout={args.image_layout}",
    ]
    if args.cache:
        overrides.append(f"data.feature_cache={root / 'cache'}")
    task = VLMTask(load_vlm_config(ROOT / "configs/vlm/tiny_align.yaml", overrides))
    torch.manual_seed(SEED)  # the tower of prepare()
    engine, _ = build_task_engine(task, rank, world)
    batches = iter(task.build_loader(rank, world, None))
    for _ in range(args.warmup):
        train_step(engine, batches, task.loss, task.loss_items)
    torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(engine, batches, task.loss, task.loss_items)
    torch.distributed.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        record = {
            "steps_per_s": args.steps / seconds,
            "samples_per_s": args.steps * args.batch * world / seconds,
        }
        print_result(record)


def launch(args: argparse.Namespace, root: Path, tokens: int, cache: bool) -> dict:
    target = [
        __file__,
        "--worker",
        "--root",
        str(root),
        "--tokens",
        str(tokens),
        "--tower",
        args.tower,
        "--decoder",
        args.decoder,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--num-workers",
        str(args.num_workers),
        "--precision",
        args.precision,
        "--zero",
        str(args.zero),
        "--image-layout",
        args.image_layout,
    ] + (["--cache"] if cache else [])
    return run_for_result(args.ranks, target, timeout=7200, what="cache" if cache else "images")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tower", default="so400m_p14_384", help="tower preset (random weights)")
    parser.add_argument("--decoder", default="tiny_gemma", help="decoder preset (random weights)")
    parser.add_argument("--batch", type=int, default=8, help="samples per rank and step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--samples", type=int, default=64, help="samples in the shards (drawn again and again)"
    )
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per rank")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3])
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto")
    parser.add_argument(
        "--image-layout",
        default="fixed",
        help="image layout (model.image_layout: fixed, anyres, anyres_max_9, ...): the crops of each image",
    )
    for hidden in ("--root", "--tokens"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.tokens = int(args.tokens)
        worker(args)
        return
    with tempfile.TemporaryDirectory(prefix="align_step_") as tmp:
        root = Path(tmp)
        info = prepare(args, root)
        rows = {
            "images": launch(args, root, info["tokens"], False),
            "cache": launch(args, root, info["tokens"], True),
        }
    print(
        f"stage align, tower {args.tower} (image layout {args.image_layout}: "
        f"{info['crops'] / info['samples']:.0f} crops, {info['tokens']} tokens/image, random weights), "
        f"decoder {args.decoder}, "
        f"linear connector; {args.ranks} rank(s), ZeRO-{args.zero}, batch {args.batch}/rank, "
        f"{args.num_workers} "
        f"loader workers/rank, precision {args.precision}; {args.steps} timed steps after {args.warmup}"
    )
    print(f"{'input':8} {'steps/s':>9} {'samples/s':>10} {'vs images':>10}")
    base = rows["images"]["steps_per_s"]
    for name, r in rows.items():
        print(f"{name:8} {r['steps_per_s']:9.3f} {r['samples_per_s']:10.1f} {r['steps_per_s'] / base:9.2f}x")
    print(
        f"writing the cache of {info['samples']} samples took {info['extract_s']:.1f} s "
        f"({info['samples'] / info['extract_s']:.1f} samples/s), once"
    )


if __name__ == "__main__":
    main()
