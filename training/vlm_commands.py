"""The vision-language subcommands of ``vision-tower``: generate, and ``eval vlm`` (neither needs DeepSpeed)."""

from __future__ import annotations

import argparse
import sys

from .cli_args import check_device, positive_int
from .tower_commands import add_dtype_option


def cmd_generate(args: argparse.Namespace) -> None:
    from connectors import VisionLanguageModel
    from connectors.generation import generate_text
    from vision_tower.hardware import choose_precision

    check_device(args.device)
    precision = choose_precision(args.dtype, args.device)
    print(precision.describe(), file=sys.stderr, flush=True)  # stdout holds only the generated text
    vlm = VisionLanguageModel.from_pretrained(args.model, dtype=precision.dtype, device=args.device).eval()
    (text,) = generate_text(vlm, [args.image], [args.prompt], max_new_tokens=args.max_new_tokens)
    print(text)


def add_vlm_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="continue a prompt about an image with a vision-language model (greedy)"
    )
    p.add_argument(
        "--model", required=True, help="VLM folder or hub repo id: native, PaliGemma or LLaVA layout"
    )
    p.add_argument("--image", required=True, help="image file")
    p.add_argument(
        "--prompt",
        default="",
        help="text after the image (PaliGemma layout: image, bos, prompt, newline); a prompt holding <image> "
        "gets the image placeholders there instead (LLaVA style). Default: empty (caption)",
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--device", default=None, help="e.g. cuda, cpu")
    add_dtype_option(p)
    p.set_defaults(func=cmd_generate)


def cmd_eval_vlm(args: argparse.Namespace) -> None:
    """``vision-tower eval vlm``: held-out loss and exact match of a saved VLM (any format)."""
    import json

    from connectors import VisionLanguageModel
    from vision_tower.hardware import choose_precision

    from .data.vlm import builder_for
    from .vlm_eval import evaluate_vlm, read_eval_items

    precision = choose_precision(args.dtype)
    print(precision.describe(), file=sys.stderr, flush=True)  # stdout stays one JSON document
    vlm = VisionLanguageModel.from_pretrained(args.model, dtype=precision.dtype).eval()
    builder = builder_for(vlm, max_length=args.max_length, caption_prompt=args.caption_prompt)
    items = read_eval_items(builder, args.shards, args.max_samples)
    result = evaluate_vlm(vlm, items, builder, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    out = {**result.metrics(), **precision.metadata(), "predictions": result.predictions[: args.predictions]}
    print(json.dumps(out, indent=2))
