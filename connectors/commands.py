"""The vision-language command of ``vision-tower``: ``generate``. ``add_generate`` is its entry in the
``vision_tower.commands`` entry-point group (pyproject.toml); the command needs the ``[connectors]``
extra, which the core checks before it runs."""

from __future__ import annotations

import argparse
import sys

from vision_tower.cli import add_dtype_option, check_device, positive_int


def cmd_generate(args: argparse.Namespace) -> None:
    from vision_tower.hardware import choose_precision

    from .chat_template import read_template
    from .generation import generate_text
    from .vlm import VisionLanguageModel

    check_device(args.device)
    precision = choose_precision(args.dtype, args.device)
    print(precision.describe(), file=sys.stderr, flush=True)  # stdout holds only the generated text
    template = None if args.chat_template is None else read_template(args.chat_template)
    vlm = VisionLanguageModel.from_pretrained(args.model, dtype=precision.dtype, device=args.device).eval()
    (text,) = generate_text(
        vlm,
        args.image,
        [args.prompt],
        chat=args.chat,
        chat_template=template,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop_strings=args.stop,
        seed=args.seed,
    )
    print(text)


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="continue a prompt about an image with a vision-language model (greedy or sampled)"
    )
    p.add_argument(
        "--model", required=True, help="VLM folder or hub repo id: native, PaliGemma or LLaVA layout"
    )
    p.add_argument(
        "--image",
        required=True,
        action="append",
        help="image file; repeat it for a prompt about several images, which writes <image> where each goes",
    )
    p.add_argument(
        "--prompt",
        default="",
        help="text after the image (PaliGemma layout: image, bos, prompt, newline); a prompt holding <image> "
        "gets the image placeholders there instead (LLaVA style), one <image> per --image. Default: empty "
        "(caption)",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="the prompt is a user's turn: render it with the model's chat template (the one it was trained "
        "and saved with) and its generation prompt, as training renders conversations",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="with --chat (implied): plain, v1 or a Jinja file instead of the model's saved template",
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--sample", action="store_true", help="draw each token (default: the most likely)")
    p.add_argument("--temperature", type=float, default=1.0, help="with --sample: > 0; lower is sharper")
    p.add_argument(
        "--top-k", type=positive_int, default=None, help="with --sample: draw from the K likeliest"
    )
    p.add_argument(
        "--top-p", type=float, default=None, help="with --sample: from the likeliest tokens holding this mass"
    )
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeated tokens")
    p.add_argument(
        "--stop", action="append", default=[], help="stop once the text holds this string (repeatable)"
    )
    p.add_argument("--seed", type=int, default=None, help="with --sample: repeatable draws")
    p.add_argument("--device", default=None, help="e.g. cuda, cpu")
    add_dtype_option(p)
    p.set_defaults(func=cmd_generate, extra="connectors")
