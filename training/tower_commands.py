"""The tower subcommands of ``vision-tower``: info, extract, convert (they need no DeepSpeed)."""

from __future__ import annotations

import argparse
import json

from vision_tower import list_presets
from vision_tower.features import COMPILE_MIN_BATCHES, extract_to_file
from vision_tower.saving import FORMATS
from vision_tower.sources import convert, describe

from .cli_args import check_device, check_new_output, positive_int

DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]
DTYPE_HELP = (
    "auto (default): bfloat16 on CUDA and on CPUs with native bf16 matmul (AMX or AVX512-BF16), "
    "float32 otherwise; the choice and its reason are printed first"
)


def add_dtype_option(p: argparse.ArgumentParser) -> None:
    """``--dtype auto|float32|bfloat16|float16`` (shared with ``eval``)."""
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)


def _vlm_description(src: str):
    """The description of a VLM checkpoint (connectors/), or None for towers and presets."""
    try:
        from connectors.describe import describe_vlm
    except ImportError:  # the connectors extra (transformers) is not installed
        return None
    return describe_vlm(src)


def cmd_info(args: argparse.Namespace) -> None:
    vlm = _vlm_description(args.src)
    if vlm is not None:
        print("\n".join(vlm.lines()))
        return
    d = describe(args.src)
    what = "SiglipModel: image + text towers" if d["kind"] == "SiglipModel" else "image tower"
    print(f"source: {d['source']} ({what})")
    print("image tower: " + json.dumps(d["vision"]))
    print(f"  parameters: {d['vision_params'] / 1e6:.2f}M (pooling head {d['head_params'] / 1e6:.2f}M)")
    if d["text"] is not None:
        print("text tower: " + json.dumps(d["text"]))
        print(f"  parameters: {d['text_params'] / 1e6:.2f}M")
    print(f"token grid (patch {d['patch_size']}):")
    for size, g in d["grids"].items():
        mark = "  <- native" if size == d["native_size"] else ""
        print(f"  {size:4d} px: {g}x{g} = {g * g} tokens{mark}")


def cmd_extract(args: argparse.Namespace) -> None:
    if args.shards is not None:
        return cmd_extract_shards(args)
    check_new_output(args.out, args.overwrite, kind="file")
    check_device(args.device)
    feats = extract_to_file(
        args.model,
        args.images,
        args.out,
        image_size=args.image_size,
        max_num_patches=args.max_num_patches,
        feature_layer=args.layer,
        use_head=False if args.no_head else None,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        progress=not args.quiet,
        log=print,
    )
    grids = (
        feats.grid if feats.grid is not None else "per image " + ", ".join(f"{h}x{w}" for h, w in feats.grids)
    )
    print(
        f"wrote {args.out}: patch_features {tuple(feats.patch_features.shape)}, grid {grids}, "
        f"pooled {None if feats.pooled is None else tuple(feats.pooled.shape)}; "
        f"{len(feats.files)} images, {len(feats.skipped)} skipped"
    )
    for name, reason in feats.skipped.items():
        print(f"  skipped {name}: {reason}")


def cmd_extract_shards(args: argparse.Namespace) -> None:
    """``extract --shards``: a feature cache of a shard set for stage align (``data.feature_cache``)."""
    from .data.feature_cache import extract_to_cache

    for flag, given in (("--max-num-patches", args.max_num_patches), ("--no-head", args.no_head)):
        if given:
            raise ValueError(
                f"{flag} does not apply to --shards (a cache holds patch features of a fixed-size tower)"
            )
    check_new_output(args.out, args.overwrite)
    check_device(args.device)
    s = extract_to_cache(
        args.model,
        args.shards,
        args.out,
        image_size=args.image_size,
        feature_layer=args.layer,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        progress=not args.quiet,
    )
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(s.skipped.items())) or "none"
    print(
        f"wrote the feature cache {s.out_dir}: {s.samples} samples of {s.shards} shards, grid {s.grid[0]}x"
        f"{s.grid[1]}, width {s.dim}, in {s.seconds:.1f}s; skipped: {skipped}. Train with data.feature_cache={s.out_dir}"
    )


def cmd_convert(args: argparse.Namespace) -> None:
    check_new_output(args.out, args.overwrite)
    done = convert(
        args.src,
        args.out,
        image_size=args.image_size,
        use_head=False if args.no_head else None,
        vision_only=args.vision_only,
        to=args.to,
        allow_gelu_change=args.allow_gelu_change,
    )
    size = "" if done.image_size is None else f", image_size {done.image_size}"
    print(f"wrote {done.kind} in the {done.format} layout to {args.out}: {done.num_tensors} tensors{size}")


def add_tower_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="config, parameter counts and token grid per resolution of a checkpoint; for a VLM checkpoint: "
        "tower, feature layer, connector, tokens per image, decoder",
    )
    p.add_argument(
        "src", help=f"folder, .safetensors file, hub repo id, or preset:NAME ({', '.join(list_presets())})"
    )
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "extract",
        help="patch features of image files into a .safetensors file, or of a shard set into a feature cache",
    )
    p.add_argument("--model", required=True, help="folder, file, hub repo id or preset:NAME")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="image files and/or folders (searched recursively)")
    src.add_argument(
        "--shards",
        help="WebDataset shards (brace pattern or folder): write a feature cache folder for VLM training "
        "(data.feature_cache), features keyed by sample",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output .safetensors (patch_features, pooled; names in metadata); with --shards a folder",
    )
    p.add_argument(
        "--image-size", type=positive_int, default=None, help="resize the position table for this size"
    )
    p.add_argument(
        "--max-num-patches",
        type=positive_int,
        default=None,
        help="NaFlex towers: patch budget per image (aspect ratio kept; default: the checkpoint's)",
    )
    p.add_argument(
        "--layer", type=int, default=-1, help="-1: final post-layernorm output; k: block k (-2: LLaVA)"
    )
    p.add_argument("--no-head", action="store_true", help="skip the attention-pooling head")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--device", default=None, help="e.g. cuda, cpu")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_dtype_option(p)
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"run the tower under torch.compile (default: on from {COMPILE_MIN_BATCHES} batches when a "
        "compiler is available)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("convert", help="write a checkpoint in the transformers, timm or open_clip layout")
    p.add_argument("src", help="folder, file or hub repo id in any supported layout (or preset:NAME)")
    p.add_argument("out", help="output folder (must not exist or be empty)")
    p.add_argument(
        "--to",
        choices=FORMATS,
        default="hf",
        help="hf: transformers SiglipModel/SiglipVisionModel; timm: the image tower as timm's "
        "model.safetensors + config.json; open_clip: both towers as open_clip_model.safetensors + "
        "open_clip_config.json",
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="resize the position table (written to the file)",
    )
    p.add_argument("--overwrite", action="store_true", help="write into an existing, non-empty output folder")
    p.add_argument("--no-head", action="store_true", help="drop the attention-pooling head")
    p.add_argument(
        "--allow-gelu-change",
        action="store_true",
        help="--to open_clip: let open_clip run the image tower with the GELU timm builds for its shape "
        "(exact instead of tanh for so400m/14 and B/16, as open_clip's own releases do)",
    )
    p.add_argument("--vision-only", action="store_true", help="write only the image tower of a SiglipModel")
    p.set_defaults(func=cmd_convert)
