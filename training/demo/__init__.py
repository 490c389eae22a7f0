"""The built-in demo: shapes data -> tokenizer -> 2-rank ZeRO-2 pretraining of a tiny SigLIP ->
held-out zero-shot accuracy -> exported towers -> patch features -> a tiny Gemma-shaped decoder with a
tokenizer of its own -> stage text (the decoder learns to write a caption after its class's words) ->
stage align (connector, with held-out captions) -> stage finetune (connector and decoder) -> held-out
captions from the exported PaliGemma folder. Needs no download and no source checkout (its configs ship
in the package)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from ..runner.launch import launch
from ..runner.paths import configs_dir
from ..tokenizer_train import length_report, train_decoder_tokenizer, train_tokenizer
from .shapes import CAPTION_TEMPLATES, CLASSES, ZEROSHOT_TEMPLATES, ShapesSummary, make_shapes, same_class

DEFAULT_OUT = "vision-tower-demo"
DEMO_CONFIG = configs_dir() / "pretrain" / "demo_tiny.yaml"
TEXT_CONFIG = configs_dir() / "vlm" / "tiny_text.yaml"
ALIGN_CONFIG = configs_dir() / "vlm" / "tiny_align.yaml"
FINETUNE_CONFIG = configs_dir() / "vlm" / "tiny_finetune.yaml"
# what a demo writes into its folder (and --overwrite removes)
OUTPUTS = ("shapes", "tokenizer", "run", "features.safetensors", "decoder-tokenizer", "vlm")
STEPS = 9  # the demo's numbered steps
CAPTION_EVAL_SAMPLES = 512  # held-out images captioned at the end (the whole val split)
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
    from vision_tower.cli import clear_outputs

    clear_outputs(out_dir, OUTPUTS)
    return out_dir


def run_demo(
    out: str | Path | None = None,
    *,
    steps: int | None = None,
    vlm_steps: int | None = None,
    ranks: int = 2,
    train_samples: int = 8192,
    overwrite: bool = False,
    overrides: list[str] = (),
) -> dict:
    """Run the demo into ``out`` (default ``./vision-tower-demo``); ``steps`` shortens pretraining,
    ``vlm_steps`` each VLM stage. Returns the final metrics: pretraining's and ``caption_match`` /
    ``caption_exact`` of the held-out captions."""
    out_dir = Path(out or DEFAULT_OUT).resolve()
    print(f"vision-tower demo -> {out_dir}", flush=True)
    prepare_out_dir(out_dir, overwrite)
    data = out_dir / "shapes"
    print(f"[1/{STEPS}] writing the shapes dataset to {data}", flush=True)
    summary = make_shapes(data, n_train=train_samples, n_val=512, shard_size=1024, image_size=32)
    final = pretrain_tower(out_dir, summary, steps=steps, ranks=ranks, overrides=overrides)
    paligemma, aligned = train_vlm_stages(out_dir, summary, steps=vlm_steps, ranks=ranks)
    final.update(aligned)
    final.update(caption_held_out(paligemma, summary.val, STEPS))
    return final


def _launch(ranks: int, args: list[str], what: str) -> None:
    try:
        launch(ranks, args)
    except subprocess.CalledProcessError as err:
        raise ChildProcessError(
            f"{what} failed (exit code {err.returncode} on {ranks} rank(s)); its output is above"
        ) from None


def pretrain_tower(
    out_dir: Path, summary: ShapesSummary, *, steps: int | None, ranks: int, overrides: list[str] = ()
) -> dict:
    """Tokenizer, 2-rank pretraining, zero-shot figures, exports and patch features (steps 2 to 4)."""
    tokenizer_dir = out_dir / "tokenizer"
    tok = train_tokenizer(caption_corpus(), tokenizer_dir, vocab_size=VOCAB_SIZE, max_length=MAX_LENGTH)
    fit = length_report(tok, caption_corpus())
    if fit.fit_share < 1:
        raise RuntimeError(f"the demo tokenizer cuts some captions or prompts: {fit.lines()}")
    print(
        f"[2/{STEPS}] trained a {tok.vocab_size}-piece sentencepiece tokenizer on the captions -> "
        f"{tokenizer_dir}; "
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
    print(f"[3/{STEPS}] pretraining a tiny SigLIP on {ranks} CPU rank(s) under ZeRO-2 -> {run}", flush=True)
    _launch(ranks, [*args, *overrides], "pretraining")
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    print(
        f"[4/{STEPS}] held-out zero-shot accuracy on {len(CLASSES)} shape classes: top-1 "
        f"{final['zeroshot_top1']:.1%}"
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
        f"patch features (layer -2, 48 px) {out_dir / 'features.safetensors'}",
        flush=True,
    )
    return final


def train_vlm_stages(
    out_dir: Path, summary: ShapesSummary, *, steps: int | None, ranks: int
) -> tuple[Path, dict[str, float]]:
    """A decoder tokenizer, then ``train-vlm`` stages text, align (with its held-out captions) and finetune
    with the shipped tiny configs on the pretrained tower (steps 5 to 8); returns the fine-tuned model's
    PaliGemma folder and the held-out figure after align."""
    tokenizer_dir = out_dir / "decoder-tokenizer"
    tok = train_decoder_tokenizer(caption_corpus(), tokenizer_dir)
    print(
        f"[5/{STEPS}] trained a {len(tok)}-piece sentencepiece tokenizer (Gemma layout) for the decoder -> "
        f"{tokenizer_dir}",
        flush=True,
    )
    text, align, finetune = (out_dir / "vlm" / name for name in ("text", "align", "finetune"))
    data = [f"data.train_shards={summary.train}", f"data.val_shards={summary.val}"]
    if steps is not None:
        data.append(f"run.steps={steps}")
    tower = out_dir / "run" / "export" / "vision"
    print(
        f"[6/{STEPS}] stage text: a random 2-layer Gemma-shaped decoder learns to write each caption after "
        f"its class's words (no image), {ranks} CPU rank(s) -> {text}",
        flush=True,
    )
    _launch(
        ranks,
        [
            "train-vlm",
            "--config",
            str(TEXT_CONFIG),
            f"run.out_dir={text}",
            f"model.tower={tower}",
            f"model.tokenizer={tokenizer_dir}",
            *data,
        ],
        "stage text",
    )
    print(
        f"[7/{STEPS}] stage align: a linear connector between the pretrained tower and that decoder (both "
        f"frozen) -> {align}",
        flush=True,
    )
    _launch(
        ranks,
        [
            "train-vlm",
            "--config",
            str(ALIGN_CONFIG),
            f"run.out_dir={align}",
            f"model.tower={tower}",
            f"model.decoder={text / 'export' / 'native' / 'decoder'}",
            f"model.tokenizer={text / 'export' / 'native'}",
            *data,
        ],
        "stage align",
    )
    aligned = caption_held_out(align / "export" / "native", summary.val, 7, after="align")
    print(
        f"[8/{STEPS}] stage finetune: connector and decoder train, the tower stays frozen -> {finetune}",
        flush=True,
    )
    _launch(
        ranks,
        [
            "train-vlm",
            "--config",
            str(FINETUNE_CONFIG),
            f"run.out_dir={finetune}",
            f"model.init_from={align / 'export' / 'native'}",
            *data,
        ],
        "stage finetune",
    )
    return finetune / "export" / "paligemma", aligned


def caption_held_out(
    model: Path, val_shards: str, step: int, *, after: str | None = None, samples: int = CAPTION_EVAL_SAMPLES
) -> dict[str, float]:
    """Caption held-out images with an exported folder (loaded back) and print how many captions name the
    right colour and shape, next to chance (and, for the final model, to word-for-word equality);
    ``after``: the stage whose export this is, for a figure along the way."""
    from connectors import VisionLanguageModel

    from ..data.vlm import builder_for
    from ..eval.vlm import evaluate_vlm, exact_match, read_eval_items

    vlm = VisionLanguageModel.from_pretrained(model).eval()
    builder = builder_for(vlm, max_length=48)
    items = read_eval_items(builder, val_shards, samples)
    print(f"[{step}/{STEPS}] captioning {len(items)} held-out images with {model}", flush=True)
    result = evaluate_vlm(vlm, items, builder, batch_size=64, max_new_tokens=12, match=same_class)
    figure = f"{result.exact_match:.1%} (colour and shape both right; chance {1 / len(CLASSES):.1%})"
    if after is not None:
        print(f"after stage {after}, held-out caption exact-match: {figure}", flush=True)
        return {f"caption_match_{after}": result.exact_match}
    exact = sum(exact_match(p["generated"], p["answer"]) for p in result.predictions) / len(items)
    for p in result.predictions[:3]:
        print(f"  {p['key']}: {p['generated']!r} (caption {p['answer']!r})")
    print(
        f"word for word equal to the caption: {exact:.1%} (its template is one of {len(CAPTION_TEMPLATES)} "
        "drawn at random: the image does not show it)"
    )
    print(f"held-out caption exact-match: {figure}")
    print(
        f"PaliGemma folder (transformers PaliGemmaForConditionalGeneration, vision-tower generate): {model}",
        flush=True,
    )
    return {"caption_match": result.exact_match, "caption_exact": exact, "caption_samples": len(items)}
