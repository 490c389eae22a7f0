"""The tower subcommands of ``vision-tower``: info, extract, convert (they need no DeepSpeed)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vision_tower import ImageProcessor, SiglipModel, VisionTower, list_presets
from vision_tower.checkpoint import read_checkpoint
from vision_tower.hub import resolve

PRESET_PREFIX = "preset:"
INFO_SIZES = (224, 256, 384, 448, 512)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_full_model(src: str) -> bool:
    if src.startswith(PRESET_PREFIX):
        return True
    path = resolve(src)
    folder = path if path.is_dir() else path.parent
    config = folder / "config.json"
    return config.exists() and json.loads(config.read_text()).get("model_type") == "siglip"


def load_tower(src: str, **kw) -> VisionTower:
    """``preset:NAME`` (random weights) or anything ``VisionTower.from_pretrained`` reads."""
    if src.startswith(PRESET_PREFIX):
        name = src[len(PRESET_PREFIX) :]
        tower = VisionTower.from_preset(name, feature_layer=kw.get("feature_layer", -1))
        if kw.get("use_head") is False:
            tower.head, tower.config.use_head = None, False
        if kw.get("image_size"):
            tower.resize_pos_embed(kw["image_size"])
        return tower.to(device=kw.get("device"), dtype=kw.get("dtype"))
    return VisionTower.from_pretrained(src, **kw)


def _count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def cmd_info(args: argparse.Namespace) -> None:
    full = _is_full_model(args.src)
    if args.src.startswith(PRESET_PREFIX):  # shapes only: build on the meta device, no weights
        with torch.device("meta"):
            model = SiglipModel.from_preset(args.src[len(PRESET_PREFIX) :])
        tower, text = model.vision, model.text
    elif full:
        model = SiglipModel.from_pretrained(args.src)
        tower, text = model.vision, model.text
    else:
        tower, text = load_tower(args.src), None
    cfg = tower.config
    print(f"source: {args.src} ({'SiglipModel: image + text towers' if full else 'image tower'})")
    print("image tower: " + json.dumps(cfg.to_dict()))
    print(f"  parameters: {_count(tower) / 1e6:.2f}M (pooling head {_count(tower.head) / 1e6:.2f}M)")
    if text is not None:
        print("text tower: " + json.dumps(text.config.to_dict()))
        print(f"  parameters: {_count(text) / 1e6:.2f}M")
    print(f"token grid (patch {cfg.patch_size}):")
    for size in sorted({*INFO_SIZES, cfg.image_size}):
        g = size // cfg.patch_size
        mark = "  <- native" if size == cfg.image_size else ""
        print(f"  {size:4d} px: {g}x{g} = {g * g} tokens{mark}")


def cmd_extract(args: argparse.Namespace) -> None:
    from vision_tower.features import extract_features, iter_image_files

    tower = load_tower(
        args.model,
        image_size=args.image_size,
        feature_layer=args.layer,
        use_head=False if args.no_head else None,
        device=args.device,
        dtype=DTYPES[args.dtype],
    ).eval()
    files = list(iter_image_files(args.images))
    if not files:
        raise SystemExit(f"no image files found in {args.images}")
    processor = processor_for(args.model, tower.config.image_size)
    feats = extract_features(
        tower, files, processor=processor, batch_size=args.batch_size, progress=not args.quiet
    )
    feats.save(args.out, model=args.model, feature_layer=str(args.layer))
    print(
        f"wrote {args.out}: patch_features {tuple(feats.patch_features.shape)}, grid {feats.grid}, "
        f"pooled {None if feats.pooled is None else tuple(feats.pooled.shape)}; "
        f"{len(feats.files)} images, {len(feats.skipped)} skipped"
    )
    for name, reason in feats.skipped.items():
        print(f"  skipped {name}: {reason}")


def processor_for(src: str, image_size: int) -> ImageProcessor:
    """The checkpoint's own preprocessing (mean/std/filter) at ``image_size`` if it ships one, else SigLIP's."""
    if not src.startswith(PRESET_PREFIX):
        path = resolve(src)
        folder = path if path.is_dir() else path.parent
        if (folder / "preprocessor_config.json").exists():
            return ImageProcessor.from_pretrained(folder).with_image_size(image_size)
    return ImageProcessor(image_size=image_size)


def cmd_convert(args: argparse.Namespace) -> None:

    if _is_full_model(args.src) and not args.vision_only:
        if args.image_size or args.no_head:
            raise SystemExit("--image-size/--no-head apply to the image tower: add --vision-only")
        model = SiglipModel.from_pretrained(args.src)
        model.save_pretrained(args.out)
        size = model.vision.config.image_size
        what = "SiglipModel"
    else:
        tower = load_tower(args.src, image_size=args.image_size, use_head=False if args.no_head else None)
        tower.save_pretrained(args.out)
        size = tower.config.image_size
        what = "SiglipVisionModel"
    processor_for(args.src, size).save_pretrained(args.out)
    sd, _ = read_checkpoint(Path(args.out))
    print(f"wrote {what} layout to {args.out}: {len(sd)} tensors, image_size {size}")


def extract_demo(tower_dir: Path, images: Path, out: Path) -> None:
    """Patch features of the demo tower from layer -2 at a resized 48 px (the extractor path)."""
    ns = argparse.Namespace(
        model=str(tower_dir),
        images=[str(images)],
        out=str(out),
        image_size=48,
        layer=-2,
        no_head=False,
        batch_size=64,
        device=None,
        dtype="float32",
        quiet=True,
    )
    cmd_extract(ns)


def add_tower_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="config, parameter counts and token grid per resolution of a checkpoint")
    p.add_argument(
        "src", help=f"folder, .safetensors file, hub repo id, or preset:NAME ({', '.join(list_presets())})"
    )
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("extract", help="patch features of image files into a .safetensors file")
    p.add_argument("--model", required=True, help="folder, file, hub repo id or preset:NAME")
    p.add_argument(
        "--images", nargs="+", required=True, help="image files and/or folders (searched recursively)"
    )
    p.add_argument(
        "--out", required=True, help="output .safetensors (patch_features, pooled; names in metadata)"
    )
    p.add_argument("--image-size", type=int, default=None, help="resize the position table for this size")
    p.add_argument(
        "--layer", type=int, default=-1, help="-1: final post-layernorm output; k: block k (-2: LLaVA)"
    )
    p.add_argument("--no-head", action="store_true", help="skip the attention-pooling head")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="e.g. cuda, cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="bfloat16 on GPUs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("convert", help="write a checkpoint in the transformers layout (safetensors)")
    p.add_argument("src", help="folder, file or hub repo id in any supported layout")
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--image-size", type=int, default=None, help="resize the position table (written to the file)"
    )
    p.add_argument("--no-head", action="store_true", help="drop the attention-pooling head")
    p.add_argument("--vision-only", action="store_true", help="write only the image tower of a SiglipModel")
    p.set_defaults(func=cmd_convert)
