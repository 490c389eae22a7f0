"""The training commands of ``vision-tower``: pretrain, train-vlm, train-tokenizer, make-shapes, eval, demo,
and the ``extract --shards`` hook (a feature cache for VLM training).

Each ``add_*`` function is one entry of the ``vision_tower.commands`` entry-point group (pyproject.toml)
and adds the parser of the command it is named for; every command here needs the ``[train]`` extra,
which the core checks before the command runs. This module imports nothing beyond the core at import
time, so the commands are listed (and name their extra) in a core install."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vision_tower.cli import add_dtype_option, check_new_output, clear_outputs, extract_options, positive_int
from vision_tower.extras import require

EXTRA = "train"


class _ResumeAction(argparse.Action):
    """``--resume`` (a checkpoint must exist) or ``--resume auto`` (start fresh when none does). A
    ``key=value`` right after a bare ``--resume`` is an override, not its value."""

    def __call__(self, parser, namespace, value, option_string=None):
        if value is not None and "=" in value:
            namespace.leading_overrides = [*getattr(namespace, "leading_overrides", []), value]
            # where it goes among the overrides: after those given before --resume, which argparse has read
            namespace.resume_at = len(getattr(namespace, "overrides", None) or [])
            value = None
        if value not in (None, self.const, "auto"):
            parser.error(f"--resume takes no value or 'auto', got {value!r}")
        setattr(namespace, self.dest, value or self.const)


def _print_on_rank0(result: dict) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(dict(result), default=str))


def _overrides_in_order(args: argparse.Namespace) -> list[str]:
    """The ``key=value`` overrides in command-line order (the last one of a key wins): those before
    ``--resume``, the one right after it (which argparse hands to ``--resume``), then the rest."""
    overrides = list(args.overrides)
    at = getattr(args, "resume_at", 0)
    overrides[at:at] = getattr(args, "leading_overrides", [])
    return overrides


def _train(args: argparse.Namespace, load_config, make_task) -> None:
    """Load the run config (YAML plus ``key=value`` overrides), run the task, print the final metrics."""
    import logging
    import os

    from .runner import train

    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"))
    cfg = load_config(args.config, _overrides_in_order(args))
    task = make_task(cfg)
    _print_on_rank0(
        train(task, resume=args.resume, overwrite=args.overwrite, allow_changes=args.resume_with_changes)
    )


def cmd_pretrain(args: argparse.Namespace) -> None:
    from .tasks.siglip import SiglipTask
    from .tasks.siglip_config import load_config

    _train(args, load_config, SiglipTask)


def cmd_train_vlm(args: argparse.Namespace) -> None:
    from .tasks.vlm import VLMTask
    from .tasks.vlm_config import load_vlm_config

    _train(args, load_vlm_config, VLMTask)


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from .tokenizer_train import captions_from_file, captions_from_shards, length_report, train_tokenizer

    check_new_output(args.out, args.overwrite)
    if args.captions is not None:
        captions, source = captions_from_file(args.captions), args.captions
    else:
        captions, source = list(captions_from_shards(args.shards, limit=args.max_captions)), args.shards
        if not captions:
            raise ValueError(f"no captions (txt, or caption/text in json) in the shards {args.shards}")
    tok = train_tokenizer(
        captions, args.out, vocab_size=args.vocab_size, max_length=args.max_length, model_type=args.model_type
    )
    pieces = f"{tok.vocab_size} pieces" + (
        f" (asked {args.vocab_size}: the captions support no more)"
        if tok.vocab_size < args.vocab_size
        else ""
    )
    print(
        f"trained a {args.model_type} tokenizer on {len(captions)} captions from {source}: {pieces} -> "
        f"{args.out}"
    )
    report = length_report(tok, captions)
    for line in report.lines():
        print(line)
    print(
        f"train with data.tokenizer={args.out}; from a preset also model.text.vocab_size={tok.vocab_size} "
        f"(or more) and model.text.max_position_embeddings={max(report.suggested_max_length, 2)}"
    )


def cmd_make_shapes(args: argparse.Namespace) -> None:
    from .demo.shapes import OUTPUTS, make_shapes

    check_new_output(args.out, args.overwrite)
    if args.overwrite:  # only what make-shapes writes; anything else in the folder stays
        clear_outputs(Path(args.out), OUTPUTS)

    sizes = {"n_train": args.n_train, "n_val": args.n_val, "shard_size": args.shard_size, "seed": args.seed}
    if args.kind == "stripes":
        from .demo.stripes import write_stripes

        made = write_stripes(args.out, tile=args.image_size, **sizes)
        print(
            f"wrote {args.n_train} train and {args.n_val} held-out samples ({made['train']}, {made['val']}): "
            f"canvases of 2x2, 1x2 and 2x1 tiles of {args.image_size} px, one checkerboard mark each; json "
            "prompt 'mark colour', answer red, green, blue or black"
        )
        return
    s = make_shapes(args.out, image_size=args.image_size, **sizes)
    print(
        f"wrote {s.n_train} train and {s.n_val} held-out pairs ({s.train}, {s.val}), {s.n_zeroshot} "
        "zero-shot "
        f"images in {len(s.classes)} class folders ({s.zeroshot}) in {s.seconds:.1f}s"
    )


def _model_and_preprocessing(src: str, tokenizer_src: str | None, dtype=None):
    """The model in ``dtype``, its own preprocessing (preprocessor_config.json if shipped) and its
    tokenizer."""
    from vision_tower import SiglipModel, Tokenizer
    from vision_tower.sources import processor_for

    model = SiglipModel.from_pretrained(src, dtype=dtype).eval()
    size = model.vision.config.image_size
    tokenizer = Tokenizer.from_pretrained(
        tokenizer_src or src, max_length=model.text.config.max_position_embeddings
    )
    return model, processor_for(src, size), tokenizer


def cmd_eval(args: argparse.Namespace) -> None:
    from vision_tower.hardware import choose_precision

    from .eval.retrieval import retrieval
    from .eval.zero_shot import list_image_folder, load_templates, zero_shot

    if args.task == "vlm":
        return cmd_eval_vlm(args)
    if args.task == "zero-shot":  # bad templates or class folders fail before the model loads
        templates = load_templates(args.templates) if args.templates else None
        list_image_folder(args.images)
    precision = choose_precision(args.dtype)
    print(precision.describe(), file=sys.stderr, flush=True)  # stdout stays one JSON document
    model, processor, tokenizer = _model_and_preprocessing(args.model, args.tokenizer, precision.dtype)
    if args.task == "zero-shot":
        result = zero_shot(
            model,
            args.images,
            templates=templates,
            image_transform=processor,
            tokenize=tokenizer,
            batch_size=args.batch_size,
        )
    else:
        result = retrieval(
            model,
            args.shards,
            image_transform=processor,
            text_transform=tokenizer,
            batch_size=args.batch_size,
        )
    print(json.dumps({**result, **precision.metadata()}, indent=2, default=str))


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(
        args.out,
        steps=args.steps,
        vlm_steps=args.vlm_steps,
        ranks=args.ranks,
        train_samples=args.train_samples,
        overwrite=args.overwrite,
    )


def cmd_eval_vlm(args: argparse.Namespace) -> None:
    """``vision-tower eval vlm``: held-out loss and exact match of a saved VLM (any format)."""
    from connectors import VisionLanguageModel
    from vision_tower.hardware import choose_precision

    from .data.vlm import builder_for
    from .eval.vlm import evaluate_vlm, read_eval_items

    held_out = _held_out(args)  # a missing file or folder fails before the model loads
    precision = choose_precision(args.dtype)
    print(precision.describe(), file=sys.stderr, flush=True)  # stdout stays one JSON document
    vlm = VisionLanguageModel.from_pretrained(args.model, dtype=precision.dtype).eval()
    builder = builder_for(
        vlm,
        max_length=args.max_length,
        caption_prompt=args.caption_prompt,
        chat_template=args.chat_template,
        key="--max-length",
    )
    items = read_eval_items(builder, held_out, args.max_samples)
    result = evaluate_vlm(vlm, items, builder, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    out = {
        **result.metrics(),
        **precision.metadata(),
        "predictions": result.predictions[: args.predictions or 0],
    }
    print(json.dumps(out, indent=2))


def _held_out(args: argparse.Namespace):
    """``eval vlm``'s samples: ``--shards``, or ``--json`` with its ``--image-folder``."""
    if args.image_folder and not args.json:
        raise ValueError("--image-folder holds the images of --json: give --json FILE too, or drop it")
    if args.shards:
        return args.shards
    from .data.json_source import JsonSource

    return JsonSource(args.json, args.image_folder, keys=("--json", "--image-folder"))


def cmd_extract_shards(args: argparse.Namespace) -> None:
    """``extract --shards`` (the core's ``extract_shards`` hook): a feature cache of a shard set for stage
    align (``data.feature_cache``)."""
    require(EXTRA, "--shards")
    from .data.feature_cache import extract_to_cache

    for flag, given in (("--max-num-patches", args.max_num_patches), ("--no-head", args.no_head)):
        if given:
            raise ValueError(
                f"{flag} does not apply to --shards (a cache holds patch features of a fixed-size tower)"
            )
    options = layout_options(args.layout_option)
    if options and not args.image_layout:
        raise ValueError("--layout-option is an option of --image-layout: name the layout too (e.g. anyres)")
    layout = args.image_layout or "fixed"
    extract = extract_options(args, kind="folder")
    s = extract_to_cache(
        args.model, args.shards, args.out, image_layout=layout, layout_options=options, **extract
    )
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(s.skipped.items())) or "none"
    print(
        f"wrote the feature cache {s.out_dir}: {s.samples} samples ({s.crops} crops, image layout "
        f"{args.image_layout or 'fixed'}) of {s.shards} shards, grid {s.grid[0]}x"
        f"{s.grid[1]}, width {s.dim}, in {s.seconds:.1f}s; skipped: {skipped}. Train with "
        f"data.feature_cache={s.out_dir}"
    )


def layout_options(pairs: list[str]) -> dict[str, Any]:
    """``--layout-option KEY=VALUE`` pairs -> options, each value read as YAML (``max_tiles=4``,
    ``grid_pinpoints=[[32, 64], [64, 32]]``)."""
    import yaml

    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--layout-option expects KEY=VALUE (e.g. max_tiles=4), got {pair!r}")
        try:
            options[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ValueError(f"--layout-option {pair!r}: the value is not YAML ({err})") from None
    return options


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """``--resume [auto]`` | ``--overwrite`` and the ``key=value`` overrides of a training command."""
    once = p.add_mutually_exclusive_group()
    once.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="auto",
        action=_ResumeAction,
        default=None,
        help="continue from the last intact committed checkpoint of run.out_dir (an error if there is "
        "none); '--resume auto' starts fresh when there is none",
    )
    once.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the previous run in run.out_dir (its checkpoints, metrics and export)",
    )
    p.add_argument(
        "--resume-with-changes",
        action="store_true",
        help="with --resume: continue from the checkpoint with changed optimizer and schedule settings "
        "(optim.lr, weight_decay, betas, eps, warmup_steps, min_lr_ratio, grad_clip), set at the resumed "
        "step. Without it a resumed run whose config differs from the checkpoint's is refused; run.steps, "
        "logging, evaluation and checkpoint cadence may always change; model, data, loss and the rest never",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. run.steps=200")


_EVAL_HELP = (
    "zero-shot classification or image-text retrieval of a SiglipModel; held-out loss and exact match of a "
    "vision-language model (vlm)"
)
_DEMO_HELP = (
    "shapes data -> 2-rank ZeRO-2 pretraining -> zero-shot eval -> export -> VLM stages text, align and "
    "finetune -> held-out captions"
)


def _counts(p: argparse.ArgumentParser, *options: tuple[str, int | None, str | None]) -> None:
    """Options that take a positive integer: (flag, default, help) each; the help names the default."""
    for flag, default, text in options:
        if default is not None:
            text = f"{text} (default: {default})" if text else f"default: {default}"
        p.add_argument(flag, type=positive_int, default=default, help=text)


def _add_training_command(
    sub: argparse._SubParsersAction,
    name: str,
    help: str,
    example: str,
    func: Callable[[argparse.Namespace], None],
) -> None:
    """A command that runs one training task from a YAML config (launched under torchrun/deepspeed)."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--config", required=True, help=f"YAML run config, e.g. {example}")
    _add_run_options(p)
    p.set_defaults(func=func, extra=EXTRA)


def add_pretrain(sub: argparse._SubParsersAction) -> None:
    _add_training_command(
        sub,
        "pretrain",
        "SigLIP pretraining under DeepSpeed ZeRO (launch with torchrun/deepspeed)",
        "configs/pretrain/demo_tiny.yaml",
        cmd_pretrain,
    )


def add_train_vlm(sub: argparse._SubParsersAction) -> None:
    _add_training_command(
        sub,
        "train-vlm",
        "one stage of vision-language training under DeepSpeed ZeRO: text (the decoder alone, on the data's "
        "text), align (connector only) or finetune (connector and decoder, in full or LoRA); launch with "
        "torchrun/deepspeed",
        "configs/vlm/tiny_align.yaml",
        cmd_train_vlm,
    )


def add_train_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-tokenizer",
        help="train a SigLIP-layout sentencepiece tokenizer on your captions; report how many fit",
        description="Train a sentencepiece tokenizer in SigLIP's layout (<pad>=0, </s>=1, <unk>=2) on the "
        "captions of a shard set or a text file, save it as a transformers SiglipTokenizer folder, and "
        "print the share of captions that fit in --max-length, the token-length percentiles and a "
        "max_length that fits 99%%.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="WebDataset shards (brace pattern or folder) whose captions to use")
    src.add_argument("--captions", help="text file with one caption per line")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument(
        "--vocab-size", type=positive_int, default=32000, help="at most this many pieces (SigLIP: 32000)"
    )
    p.add_argument(
        "--max-length", type=positive_int, default=64, help="tokens per caption, </s> included (SigLIP: 64)"
    )
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="sentencepiece model")
    p.add_argument(
        "--max-captions", type=positive_int, default=None, help="read at most this many captions from shards"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the files in an existing --out folder")
    p.set_defaults(func=cmd_train_tokenizer, extra=EXTRA)


def add_make_shapes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-shapes",
        help="write a built-in synthetic dataset: coloured shapes (the demo's), or checkerboard marks whose "
        "colour only tiles at full resolution show (--kind stripes)",
    )
    p.add_argument("--out", required=True)
    p.add_argument(
        "--kind",
        choices=["shapes", "stripes"],
        default="shapes",
        help="shapes (default): captioned shapes, zero-shot folders; stripes: a small mark on canvases of "
        "2x2, 1x2, 2x1 tiles of --image-size px, answer its colour (lost when squashed to one tile)",
    )
    p.add_argument("--n-train", type=positive_int, default=8192)
    p.add_argument("--n-val", type=positive_int, default=512)
    p.add_argument("--shard-size", type=positive_int, default=1024)
    p.add_argument("--image-size", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset in --out (only what make-shapes writes there is removed)",
    )
    p.set_defaults(func=cmd_make_shapes, extra=EXTRA)


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help=_EVAL_HELP, description=_EVAL_HELP)
    tasks = p.add_subparsers(dest="task", required=True, metavar="{zero-shot,retrieval,vlm}")

    def task(name: str, text: str, model: str) -> argparse.ArgumentParser:
        q = tasks.add_parser(name, help=text, description=text)
        q.add_argument("--model", required=True, help=model)
        q.set_defaults(func=cmd_eval, extra=EXTRA)
        return q

    siglip = "SiglipModel folder or hub id (with its tokenizer)"
    zs = task("zero-shot", "zero-shot classification of an ImageFolder by its class names", siglip)
    zs.add_argument("--images", required=True, help="ImageFolder root (one sub-folder per class)")
    zs.add_argument(
        "--templates", default=None, help="file of prompt templates with '{}' (default: built-in)"
    )
    rt = task("retrieval", "image-text retrieval (recall@k both ways) over WebDataset shards", siglip)
    rt.add_argument("--shards", required=True, help="WebDataset shards (brace pattern or folder)")
    for q in (zs, rt):
        q.add_argument("--tokenizer", default=None, help="tokenizer folder if not beside the model")
        _counts(q, ("--batch-size", 64, "images per forward pass"))
        add_dtype_option(q)
    vlm = task(
        "vlm",
        "held-out loss and exact match of a vision-language model on WebDataset shards or a JSON file "
        "with an image folder",
        "VLM folder or hub id (native, PaliGemma or LLaVA layout)",
    )
    held_out = vlm.add_mutually_exclusive_group(required=True)
    held_out.add_argument("--shards", help="WebDataset shards (brace pattern or folder)")
    held_out.add_argument(
        "--json",
        help="a JSON Lines file (or JSON array) of records, read in file order (data.val_json)",
    )
    vlm.add_argument(
        "--image-folder",
        default=None,
        help="the folder the --json records' image names are relative to (data.val_image_folder)",
    )
    _counts(
        vlm,
        ("--batch-size", 64, "rows per forward pass"),
        ("--max-samples", None, "evaluate the first N usable samples (default: every sample)"),
        ("--max-new-tokens", 32, "longest generated answer, in tokens"),
        ("--max-length", 512, "tokens per row (data.max_length of training)"),
        ("--predictions", None, "also print the first N answers (default: none)"),
    )
    vlm.add_argument(
        "--caption-prompt", default="", help="the prompt of caption samples (data.caption_prompt)"
    )
    vlm.add_argument(
        "--chat-template",
        default=None,
        help="renders conversation samples: plain, v1 or a Jinja file (model.chat_template); "
        "default: the template saved with the model (the one it was trained with)",
    )
    add_dtype_option(vlm)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help=_DEMO_HELP)
    p.add_argument("--out", default=None, help="output folder (default: ./vision-tower-demo)")
    _counts(
        p,
        ("--steps", None, "pretraining steps (default: configs/pretrain/demo_tiny.yaml's)"),
        (
            "--vlm-steps",
            None,
            "steps of each VLM stage, text, align and finetune (default: configs/vlm/tiny_text.yaml's, "
            "tiny_align.yaml's and tiny_finetune.yaml's)",
        ),
        ("--ranks", 2, "CPU ranks (processes) to train on"),
        ("--train-samples", 8192, "image-text pairs in the training shards"),
    )
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo in the output folder")
    p.set_defaults(func=cmd_demo, extra=EXTRA)
