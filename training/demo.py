"""The built-in demo: shapes data -> tokenizer -> 2-rank ZeRO-2 pretraining of a tiny SigLIP ->
held-out zero-shot accuracy -> exported towers -> patch features. Needs no download and no source
checkout (its config ships in the package)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .launch import launch
from .resources import configs_dir
from .shapes import CAPTION_TEMPLATES, CLASSES, ZEROSHOT_TEMPLATES, make_shapes
from .tokenizer_train import length_report, train_tokenizer

DEFAULT_OUT = "vision-tower-demo"
DEMO_CONFIG = configs_dir() / "pretrain" / "demo_tiny.yaml"
OUTPUTS = ("shapes", "tokenizer", "run", "features.safetensors")  # what a demo writes into its folder
SIZES = ("small", "large", "big", "tiny", "medium")
VOCAB_SIZE = 128  # = model.text.vocab_size in demo_tiny.yaml
MAX_LENGTH = 16  # = the tiny preset's text positions


def caption_corpus() -> list[str]:
    """Every caption and prompt the shapes data can produce (the tokenizer's training text)."""
    texts = []
    for name in CLASSES:
        color, shape = name.split(" ", 1)
        for size in SIZES:
            texts += [t.format(color=color, shape=shape, size=size) for t in CAPTION_TEMPLATES]
        texts += [t.format(name) for t in ZEROSHOT_TEMPLATES]
    return texts


def prepare_out_dir(out: str | Path | None, overwrite: bool) -> Path:
    """The demo's folder (default ``./vision-tower-demo``); a previous demo's outputs in it are an
    error unless ``overwrite``, which removes just those."""
    out_dir = Path(out or DEFAULT_OUT).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"demo output {out_dir} is an existing file; give --out FOLDER")
    previous = [name for name in OUTPUTS if (out_dir / name).exists()]
    if previous and not overwrite:
        raise ValueError(
            f"{out_dir} already holds a demo ({', '.join(previous)}); pass --overwrite to replace it "
            "or --out NEW_FOLDER"
        )
    from .cli_args import clear_outputs

    clear_outputs(out_dir, OUTPUTS)
    return out_dir


def run_demo(
    out: str | Path | None = None,
    *,
    steps: int | None = None,
    ranks: int = 2,
    train_samples: int = 8192,
    overwrite: bool = False,
    overrides: list[str] = (),
) -> dict:
    """Run the demo into ``out`` (default ``./vision-tower-demo``); returns the final metrics."""
    out_dir = Path(out or DEFAULT_OUT).resolve()
    print(f"vision-tower demo -> {out_dir}", flush=True)
    prepare_out_dir(out_dir, overwrite)
    data = out_dir / "shapes"
    print(f"[1/4] writing the shapes dataset to {data}", flush=True)
    summary = make_shapes(data, n_train=train_samples, n_val=512, shard_size=1024, image_size=32)
    tokenizer_dir = out_dir / "tokenizer"
    tok = train_tokenizer(caption_corpus(), tokenizer_dir, vocab_size=VOCAB_SIZE, max_length=MAX_LENGTH)
    fit = length_report(tok, caption_corpus())
    if fit.fit_share < 1:
        raise RuntimeError(f"the demo tokenizer cuts some captions or prompts: {fit.lines()}")
    print(
        f"[2/4] trained a {tok.vocab_size}-piece sentencepiece tokenizer on the captions -> {tokenizer_dir}; "
        f"every caption and zero-shot prompt fits in {MAX_LENGTH} tokens (longest {fit.longest})",
        flush=True,
    )
    run = out_dir / "run"
    args = [
        "pretrain",
        "--config",
        str(DEMO_CONFIG),
        f"run.out_dir={run}",
        f"data.train_shards={summary.train}",
        f"data.val_shards={summary.val}",
        f"data.zeroshot_dir={summary.zeroshot}",
        f"data.tokenizer={tokenizer_dir}",
    ]
    if steps is not None:
        args.append(f"run.steps={steps}")
    print(f"[3/4] pretraining a tiny SigLIP on {ranks} CPU rank(s) under ZeRO-2 -> {run}", flush=True)
    try:
        launch(ranks, [*args, *overrides])
    except subprocess.CalledProcessError as err:
        raise ChildProcessError(
            f"pretraining failed (exit code {err.returncode} on {ranks} rank(s)); its output is above"
        ) from None
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    print(
        f"[4/4] held-out zero-shot accuracy on {len(CLASSES)} shape classes: top-1 {final['zeroshot_top1']:.1%}"
        f" (chance {1 / len(CLASSES):.1%}), top-5 {final['zeroshot_top5']:.1%}; retrieval i2t R@1 "
        f"{final.get('i2t_r1', float('nan')):.1%}",
        flush=True,
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
        f"loss curve {run / 'loss.png'}; metrics {run / 'metrics.jsonl'}; "
        f"patch features (layer -2, 48 px) {out_dir / 'features.safetensors'}"
    )
    return final
