"""Image layouts against transformers' LLaVA-NeXT / LLaVA-OneVision, side by side on this machine.

Two measurements per layout (``anyres``, ``anyres_max_9``), at a tower's tile (default so400m/14 at 384 px:
27x27 tokens per crop):
  - crops: ``layout.crops(image, processor)`` (what a data-loader worker runs) against the transformers image
    processor (torchvision backend) on random images of several sizes; the pixels are checked equal;
  - pack: ``layout.pack`` (one gather over the batch; bilinear taps for shrunk grids) against
    ``pack_image_features`` (a loop over images) on random connector outputs of a batch of those sizes;
    the largest difference is printed.
Both sides run alternately; the median of ``--repeats`` is printed with the ratio (ours / transformers).

    python benchmarks/layouts.py                       # tile 384, patch 14, width 896
    python benchmarks/layouts.py --repeats 2 --tile 56 # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = [(1000, 1600), (600, 1800), (2000, 2000), (384, 384), (1200, 800), (3000, 1000)]


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (and the layout's per-size caches)
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench_crops(name, layout, reference, processor, images, repeats: int) -> None:
    import torch

    for size, image in zip(SIZES, images, strict=True):
        ours, (pixels, _) = timed(lambda: layout.crops(image, processor), repeats)  # noqa: B023
        theirs, out = timed(lambda: reference.image_processor(image, return_tensors="pt"), repeats)  # noqa: B023
        equal = torch.equal(pixels, out["pixel_values"][0])
        print(
            f"{name:13s} crops {size[0]}x{size[1]}: {pixels.shape[0]:2d} crops, {layout.num_tokens(size):5d} "
            f"tokens; ours {ours * 1e3:7.1f} ms, transformers {theirs * 1e3:7.1f} ms, "
            f"ratio {ours / theirs:.2f}, pixels equal {equal}"
        )


def bench_pack(name, layout, reference_pack, dim: int, repeats: int) -> None:
    import torch

    counts = [layout.num_crops(s) for s in SIZES]
    features = torch.randn(sum(counts), layout.crop.tokens, dim)  # (crops, T, D)
    newline = torch.randn(dim)
    per_image = list(torch.split(features, counts))
    ours, (tokens, _) = timed(lambda: layout.pack(features, SIZES, {"image_newline": newline}), repeats)
    theirs, (ref_tokens, _) = timed(lambda: reference_pack(per_image, SIZES, newline), repeats)
    diff = (tokens - ref_tokens).abs().max().item()
    print(
        f"{name:13s} pack {sum(counts)} crops of {len(SIZES)} images -> {tokens.shape[0]} tokens: ours "
        f"{ours * 1e3:.1f} ms, transformers {theirs * 1e3:.1f} ms, ratio {ours / theirs:.2f}, "
        f"max |diff| {diff:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tile", type=int, default=384)
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--dim", type=int, default=896, help="decoder width (connector outputs)")
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()

    import functools

    import numpy as np
    import torch
    from PIL import Image

    from connectors.layouts import CropShape, build_layout
    from tests.helpers import anyres_reference as R
    from vision_tower import ImageProcessor

    t, side = args.tile, args.tile // args.patch
    crop = CropShape((t, t), side * side, (side, side))
    processor = ImageProcessor(image_size=t, backend="torchvision")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in SIZES]
    print(
        f"tile {t}, patch {args.patch} ({side}x{side} tokens per crop), width {args.dim}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    for name in ("anyres", "anyres_max_9"):
        layout = build_layout(name, crop)
        pins = [list(p) for p in layout.pinpoints]
        shape = dict(tile=t, patch=args.patch, pinpoints=pins)
        if name == "anyres":
            reference = R.llava_next_processor("torchvision", t, args.patch, pins)
            reference_pack = functools.partial(R.pack_llava_next, **shape)
        else:
            reference = R.llava_onevision_processor("torchvision", t, args.patch, pins, max_tiles=9)
            reference_pack = functools.partial(R.pack_llava_onevision, **shape, max_tiles=9)
        bench_crops(name, layout, reference, processor, images, args.repeats)
        bench_pack(name, layout, reference_pack, args.dim, args.repeats)


if __name__ == "__main__":
    main()
