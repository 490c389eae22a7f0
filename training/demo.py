"""The built-in demo: shapes data -> tokenizer -> 2-rank ZeRO-2 pretraining of a tiny SigLIP ->
held-out zero-shot accuracy -> exported towers -> patch features. Needs no download."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .config import ROOT
from .launch import launch
from .shapes import CAPTION_TEMPLATES, CLASSES, ZEROSHOT_TEMPLATES, make_shapes
from .tokenizer_train import train_tokenizer

DEMO_CONFIG = ROOT / "configs" / "pretrain" / "demo_tiny.yaml"
SIZES = ("small", "large", "big", "tiny", "medium")


def caption_corpus() -> list[str]:
    """Every caption and prompt the shapes data can produce (the tokenizer's training text)."""
    texts = []
    for name in CLASSES:
        color, shape = name.split(" ", 1)
        for size in SIZES:
            texts += [t.format(color=color, shape=shape, size=size) for t in CAPTION_TEMPLATES]
        texts += [t.format(name) for t in ZEROSHOT_TEMPLATES]
    return texts


def run_demo(out: str | None, *, steps: int | None = None, ranks: int = 2, overrides: list[str] = ()) -> dict:
    out_dir = Path(out or tempfile.mkdtemp(prefix="vision-tower-demo-")).resolve()
    data = out_dir / "shapes"
    print(f"[1/4] writing the shapes dataset to {data}", flush=True)
    summary = make_shapes(data, n_train=8192, n_val=512, shard_size=1024, image_size=64)
    print(f"[2/4] training a sentencepiece tokenizer on the captions -> {out_dir / 'tokenizer'}", flush=True)
    train_tokenizer(caption_corpus(), out_dir / "tokenizer", vocab_size=128, max_length=16)
    run = out_dir / "run"
    args = [
        "pretrain",
        "--config",
        str(DEMO_CONFIG),
        f"run.out_dir={run}",
        f"data.train_shards={summary.train}",
        f"data.val_shards={summary.val}",
        f"data.zeroshot_dir={summary.zeroshot}",
        f"data.tokenizer={out_dir / 'tokenizer'}",
    ]
    if steps is not None:
        args.append(f"run.steps={steps}")
    print(f"[3/4] pretraining a tiny SigLIP on {ranks} CPU ranks under ZeRO-2 -> {run}", flush=True)
    launch(ranks, [*args, *overrides])
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    chance = 1 / len(CLASSES)
    print(
        f"[4/4] held-out zero-shot accuracy on {len(CLASSES)} shape classes: top-1 {final['zeroshot_top1']:.1%}"
        f" (chance {chance:.1%}), top-5 {final['zeroshot_top5']:.1%}; retrieval i2t R@1 "
        f"{final.get('i2t_r1', float('nan')):.1%}"
    )
    from vision_tower.features import extract_to_file

    # patch features of the exported tower from layer -2 at a resized 48 px (the extractor path)
    extract_to_file(
        str(run / "export" / "vision"),
        [summary.zeroshot],
        out_dir / "features.safetensors",
        image_size=48,
        feature_layer=-2,
        batch_size=64,
        progress=False,
    )
    print(
        f"exported: SiglipModel {run / 'export' / 'siglip'}, SiglipVisionModel {run / 'export' / 'vision'}; "
        f"loss curve {run / 'loss.png'}; metrics {run / 'metrics.jsonl'}"
    )
    return final
