"""The ``vision-tower`` command line, owned by the core.

This module holds ``main``, the error policy (an error a user's input caused is one line,
``vision-tower <cmd>: error: ...``, exit code 2), the argument types the commands share, and the tower
commands (``info``, ``extract``, ``convert``), which need nothing beyond the core install. Other
packages add their commands through the ``vision_tower.commands`` entry-point group (one entry per
command: its name and a function that adds its parser to the subparsers), and the core calls back into
them through the ``vision_tower.hooks`` group; it never imports them by name. A command whose module
cannot be imported (its extra is missing) still appears, and running it names the extra to install.
A command that needs an extra sets ``extra`` in its parser's defaults: the extra is checked before the
command does any work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from . import list_presets
from .errors import speaker_prefix
from .extras import MissingExtraError, extra_providing, require
from .features import COMPILE_MIN_BATCHES, extract_to_file
from .saving import DEFAULT_FORMAT, writable_formats
from .sources import convert, describe

COMMAND_GROUP = "vision_tower.commands"
HOOK_GROUP = "vision_tower.hooks"


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


# names the command line accepts besides the formats' own: ``--to hf`` is the transformers layout
FORMAT_ALIASES = {"hf": DEFAULT_FORMAT}


def check_new_output(path: str | os.PathLike, overwrite: bool, *, kind: str = "folder") -> None:
    """Refuse to write over what is there: a ``kind="file"`` output must not be a folder, a folder
    output must not be a file, and an existing file or non-empty folder needs ``--overwrite``."""
    out = Path(path)
    if kind == "file":
        if out.is_dir():
            raise ValueError(f"--out {out} is a folder; give the path of the file to write")
        if out.exists() and not overwrite:
            raise ValueError(f"{out} already exists; choose another path or pass --overwrite")
        return
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is an existing file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} is a folder that is not empty; choose another path or pass --overwrite")


def clear_outputs(folder: Path, names: tuple[str, ...]) -> None:
    """Remove the named files or folders inside ``folder`` (what a command wrote there before)."""
    for name in names:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def check_device(device: str | None) -> None:
    """A device torch knows, and a CUDA device needs CUDA: say so instead of failing deep inside torch."""
    if device is None:
        return
    import torch

    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(
            f"--device {device}: not a device torch knows (cpu, cuda, cuda:N, mps, ...)"
        ) from None
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (no GPU or no CUDA build of torch)")
    index = device.partition(":")[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


DTYPE_CHOICES = ["auto", "float32", "bfloat16", "float16"]
DTYPE_HELP = (
    "auto (default): bfloat16 on CUDA and on CPUs with native bf16 matmul (AMX or AVX512-BF16), "
    "float32 otherwise; the choice and its reason are printed first"
)


def add_dtype_option(p: argparse.ArgumentParser) -> None:
    """``--dtype auto|float32|bfloat16|float16`` (shared with ``eval``)."""
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help=DTYPE_HELP)


def _vlm_lines(src: str, sizes: list[tuple[int, int]] | None = None) -> list[str] | None:
    """The report of a VLM checkpoint from the ``describe_vlm`` hook, or None for towers and presets (and
    when no installed package, or no installed extra, can read VLM checkpoints)."""
    try:
        describe_vlm = hook("describe_vlm")
    except ImportError:  # the package that reads VLM checkpoints lacks its extra
        return None
    description = None if describe_vlm is None else describe_vlm(src)
    return None if description is None else description.lines(sizes)


def cmd_info(args: argparse.Namespace) -> None:
    vlm = _vlm_lines(args.src, args.image_size)
    if vlm is not None:
        print("\n".join(vlm))
        return
    if args.image_size:
        raise ValueError(
            "info --image-size gives the tokens of a VLM checkpoint's image layout; "
            f"{args.src} is an image tower (its token grid per resolution is listed without it)"
        )
    d = describe(args.src)
    what = "SiglipModel: image + text towers" if d["kind"] == "SiglipModel" else "image tower"
    if d["read_from"]:
        what += f" of this {d['read_from']} model; the rest is not read"
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


def extract_options(args: argparse.Namespace, *, kind: str) -> dict[str, Any]:
    """The options every ``extract`` run passes on (to a features file or a feature cache), once its
    output (a ``kind``: file or folder) and device are checked."""
    check_new_output(args.out, args.overwrite, kind=kind)
    check_device(args.device)
    return dict(
        image_size=args.image_size,
        feature_layer=args.layer,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        progress=not args.quiet,
    )


def cmd_extract(args: argparse.Namespace) -> None:
    if args.shards is not None:  # a feature cache for VLM training: the training package's hook
        build_cache = hook("extract_shards")
        if build_cache is None:
            raise ValueError(
                "extract --shards: no installed package writes feature caches (vision-tower's training)"
            )
        return build_cache(args)
    for flag, given in (("--image-layout", args.image_layout), ("--layout-option", args.layout_option)):
        if given:
            raise ValueError(f"{flag} applies to --shards (a feature cache of a VLM's crops), not --images")
    feats = extract_to_file(
        args.model,
        args.images,
        args.out,
        max_num_patches=args.max_num_patches,
        use_head=False if args.no_head else None,
        compile=args.compile,
        log=print,
        **extract_options(args, kind="file"),
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


def cmd_convert(args: argparse.Namespace) -> None:
    check_new_output(args.out, args.overwrite)
    if os.path.exists(args.src) and Path(args.src).resolve() == Path(args.out).resolve():
        raise ValueError(
            f"{args.out} is the checkpoint being converted; write the conversion to another folder "
            "(--overwrite never replaces the source)"
        )
    done = convert(
        args.src,
        args.out,
        image_size=args.image_size,
        use_head=False if args.no_head else None,
        vision_only=args.vision_only,
        to=FORMAT_ALIASES.get(args.to, args.to),
        allow_gelu_change=args.allow_gelu_change,
    )
    size = "" if done.image_size is None else f", image_size {done.image_size}"
    print(f"wrote {done.kind} in the {args.to} layout to {args.out}: {done.num_tensors} tensors{size}")


def image_size_arg(text: str) -> tuple[int, int]:
    """``HxW`` (or one number for a square) -> (height, width)."""
    parts = text.lower().split("x")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values, default=0) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in pixels (e.g. 384x768), got {text!r}")
    return (values[0], values[-1])


def add_tower_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="config, parameter counts and token grid per resolution of a checkpoint; for a VLM checkpoint: "
        "tower, feature layer, connector, tokens per image, decoder",
    )
    p.add_argument(
        "src", help=f"folder, .safetensors file, hub repo id, or preset:NAME ({', '.join(list_presets())})"
    )
    p.add_argument(
        "--image-size",
        type=image_size_arg,
        action="append",
        metavar="HxW",
        help="for a VLM checkpoint: the decoder tokens and crops of an image of this height x width under "
        "its image layout (repeatable; default: the tower's size, and for a tiled layout a few more)",
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
    p.add_argument(
        "--image-layout",
        default=None,
        metavar="NAME",
        help="with --shards: the VLM's image layout (model.image_layout: fixed, anyres, anyres_max_9, split, "
        "pan_and_scan, ...), whose crops of each image are cached (default fixed: one crop)",
    )
    p.add_argument(
        "--layout-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --shards: an option of --image-layout (model.layout_options; YAML value, e.g. "
        "max_tiles=4); repeatable",
    )
    p.add_argument("--batch-size", type=positive_int, default=8, help="images (with --shards: crops) a batch")
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
        choices=(*FORMAT_ALIASES, *writable_formats()),
        default="hf",
        help="hf or transformers: transformers SiglipModel/SiglipVisionModel; timm: the image tower as "
        "timm's model.safetensors + config.json; open_clip: both towers as open_clip_model.safetensors + "
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


def _entry_points(group: str) -> dict[str, metadata.EntryPoint]:
    """The group's entry points by name (the first of a name wins: an editable and a regular install of
    the same package list each entry twice)."""
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=group):
        found.setdefault(ep.name, ep)
    return found


def hook(name: str) -> Callable[..., Any] | None:
    """The function another package registered as ``name`` in the ``vision_tower.hooks`` group, or None
    when no installed package registers one. An ImportError while loading it propagates (``main`` turns
    a missing extra into its one line)."""
    ep = _entry_points(HOOK_GROUP).get(name)
    return None if ep is None else ep.load()


def _unavailable(args: argparse.Namespace) -> None:
    raise args.load_error


def _add_unavailable(sub: argparse._SubParsersAction, name: str, err: ImportError) -> None:
    """A command whose module cannot be imported: it is listed, and running it names what is missing."""
    why = MissingExtraError(missing_extra_message(err) or f"cannot be loaded: {one_line(err)}")
    p = sub.add_parser(name, help=f"(unavailable: {why})", add_help=False)
    p.set_defaults(func=_unavailable, load_error=why, accepts_any=True)


def add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Add the commands of the ``vision_tower.commands`` entry points, in name order."""
    for name, ep in sorted(_entry_points(COMMAND_GROUP).items()):
        try:
            add = ep.load()
        except ImportError as err:
            _add_unavailable(sub, name, err)
            continue
        add(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vision-tower",
        description="SigLIP vision towers: inspect, extract patch features, convert checkpoints, train.",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_tower_commands(sub)
    add_plugin_commands(sub)
    return parser


# Failures a user's input can cause; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, KeyError, yaml.YAMLError)


def one_line(err: BaseException) -> str:
    """The error's message on one line (YAML's span several; a KeyError's str() adds quotes)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split()) or type(err).__name__


def is_expected(err: BaseException) -> bool:
    """A user's input caused ``err``. A KeyError counts only when it carries a sentence (``unknown preset
    'x'; known presets: ...``): a bare missing key (``KeyError('top5')``) is a bug and keeps its traceback."""
    if isinstance(err, KeyError):
        return bool(err.args) and isinstance(err.args[0], str) and " " in err.args[0]
    return isinstance(err, EXPECTED_ERRORS)


def missing_extra_message(err: ImportError) -> str | None:
    """One line for an import that failed because an extra is missing, or None for any other ImportError
    (a bug: it keeps its traceback)."""
    if isinstance(err, MissingExtraError):
        return one_line(err)
    if isinstance(err, ModuleNotFoundError) and err.name:
        extra = extra_providing(err.name)
        if extra is not None:
            return (
                f"needs the [{extra}] extra (missing module {err.name}); install it with: "
                f'pip install "vision-tower[{extra}]"'
            )
    return None


def _is_override(arg: str) -> bool:
    return not arg.startswith("-") and "=" in arg


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    overrides = getattr(args, "overrides", None)
    if unknown and isinstance(overrides, list) and all(_is_override(u) for u in unknown):
        args.overrides += unknown  # key=value after an option (--resume a=1 b=2): argparse leaves them over
        unknown = []
    if unknown and not getattr(args, "accepts_any", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        require(getattr(args, "extra", None), "this command")
        args.func(args)
    except ImportError as err:
        message = missing_extra_message(err)
        if message is None:
            raise
        _say(args.command, err, message)
        return 2
    except EXPECTED_ERRORS as err:
        if not is_expected(err):
            raise
        _say(args.command, err, one_line(err))
        return 2
    return 0


def _say(command: str, err: BaseException, line: str) -> None:
    """One line on stderr; under a launcher, from rank 0 alone unless the error may be this rank's own."""
    prefix = speaker_prefix(err)
    if prefix is not None:
        print(f"vision-tower {command}: error: {prefix}{line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
