"""The extractor at the mission's shape, end to end: ``vision-tower extract`` of a so400m/14 tower at 384
and 448 px (block -2, no head) over a folder of photographs, against transformers' ``AutoImageProcessor``
+ ``SiglipVisionModel`` in a batched loop (``output_hidden_states``, ``interpolate_pos_encoding`` off the
native size), both in the dtype ``auto`` picks on this machine.

Each side runs in a process of its own from its start to the features on disk (reading, preprocessing,
the tower, writing), on the same random weights (a transformers folder both load) and the same photos:
crops, flips and rescales of the real photograph matplotlib ships (synthetic photographs without it).
Reported per size: images/s end to end; the tower's forward alone (timed inside transformers' loop, and
for ours by the same model in this process on the same batches) as images/s and as a share of the matmul
peak, the peak measured in the same run with the tower's own matmul shapes (its QKV, projection and MLP
products at batch x tokens rows); the cosine of each side's features to fp32 features of ours; and the
cosine between the two sides.

    python benchmarks/extract_vs_transformers.py                       # so400m/14, 384 and 448, 64 photos
    python benchmarks/extract_vs_transformers.py --images 16           # fewer photos on a slow CPU
    python benchmarks/extract_vs_transformers.py --preset b16_224 --sizes 224 --images 16   # a quick run
    python benchmarks/extract_vs_transformers.py --device cuda --images 256 --batch 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.tower_forward import cpu_model  # noqa: E402


def photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEG photographs of several sizes and aspect ratios: random crops, flips and rescales of the
    photograph matplotlib ships, or photograph-like synthetic images without it."""
    from tests.helpers.photos import make_photo, shipped_photo

    rng = np.random.default_rng(seed)
    source = shipped_photo()
    base = Image.open(source).convert("RGB") if source is not None else None
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        if base is None:
            image = make_photo(int(rng.integers(300, 900)), int(rng.integers(300, 900)), seed=i, quality=None)
        else:
            w, h = base.size
            cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            image = base.crop((x, y, x + cw, y + ch))
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            scale = rng.uniform(0.6, 1.6)
            image = image.resize(
                (max(32, int(cw * scale)), max(32, int(ch * scale))), Image.Resampling.BICUBIC
            )
        paths.append(folder / f"photo_{i:03d}.jpg")
        image.save(paths[-1], quality=92)
    return paths


def tower_folder(preset: str, folder: Path) -> Path:
    """A random tower of ``preset`` saved in transformers' layout with its preprocessor config."""
    from vision_tower import ImageProcessor, VisionTower

    torch.manual_seed(0)
    tower = VisionTower.from_preset(preset)
    tower.save_pretrained(folder)
    ImageProcessor(image_size=tower.config.image_size).save_pretrained(folder)
    return folder


def forward_flops(cfg, tokens: int) -> float:
    """FLOPs (2 per multiply-add) of one image through the patch embedding and the blocks up to block -2
    (every block but the last) at ``tokens`` tokens: QKV, projection, MLP and the two attention products."""
    d, i, blocks = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers - 1
    per_block = 2 * tokens * d * (4 * d + 2 * i) + 4 * tokens * tokens * d
    return float(2 * tokens * 3 * cfg.patch_size**2 * d + blocks * per_block)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak_of(cfg, rows: int, dtype: torch.dtype, device: str = "cpu", repeats: int = 3) -> float:
    """GFLOP/s of the tower's own matmuls (QKV, projection, MLP up and down) at ``rows`` rows, in ``dtype``:
    the best of ``repeats`` passes over the four products."""
    d, i = cfg.hidden_size, cfg.intermediate_size
    shapes = [(d, 3 * d), (d, d), (d, i), (i, d)]
    operands = [
        (torch.randn(rows, k, dtype=dtype, device=device), torch.randn(k, m, dtype=dtype, device=device))
        for k, m in shapes
    ]
    flops = sum(2 * rows * k * m for k, m in shapes)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up
        sync(device)
        start = time.perf_counter()
        for a, b in operands:
            torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def hf_child(folder: str, images: str, out: str, size: int, batch: int, dtype: str, device: str) -> None:
    """transformers' way, as a user writes it: the processor and model from the folder, a batched loop."""
    import transformers
    from safetensors.torch import save_file

    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    model = (
        transformers.SiglipVisionModel.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    )
    native = model.config.image_size
    files = sorted(Path(images).glob("*.jpg"))
    features, forward = [], 0.0
    with torch.inference_mode():
        for start in range(0, len(files), batch):
            chunk = [Image.open(f).convert("RGB") for f in files[start : start + batch]]
            pixels = processor(images=chunk, size={"height": size, "width": size}, return_tensors="pt")
            pixels = pixels["pixel_values"].to(device, getattr(torch, dtype))
            sync(device)
            begin = time.perf_counter()
            hidden = model(pixels, output_hidden_states=True, interpolate_pos_encoding=size != native)
            sync(device)
            forward += time.perf_counter() - begin
            features.append(hidden.hidden_states[-2].float().cpu())
    save_file({"patch_features": torch.cat(features)}, out)
    print(json.dumps({"forward_s": forward}))


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def our_forward(folder: Path, files: list[Path], size: int, batch: int, dtype: torch.dtype, device: str):
    """Our tower's forward alone on the same batches (seconds), and fp32 features of ours (the reference
    for the cosines)."""
    from vision_tower import ImageProcessor, VisionTower, load_image

    options = dict(image_size=size, feature_layer=-2, use_head=False)
    tower = VisionTower.from_pretrained(folder, dtype=dtype, device=device, **options).eval()
    same = dtype == torch.float32  # then the timed run's features are the reference themselves
    fp32 = (
        tower if same else VisionTower.from_pretrained(folder, dtype=torch.float32, device=device, **options)
    )
    processor = ImageProcessor(image_size=size)
    forward, reference = 0.0, []
    with torch.inference_mode():
        for start in range(0, len(files), batch):
            pixels = torch.stack([processor(load_image(f))[0] for f in files[start : start + batch]]).to(
                device
            )
            sync(device)
            begin = time.perf_counter()
            out = tower(pixels.to(dtype))
            sync(device)
            forward += time.perf_counter() - begin
            reference.append((out.patch_features if same else fp32.eval()(pixels).patch_features).cpu())
    return forward, torch.cat(reference).float()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The smallest per-token cosine similarity between two (N, T, D) feature sets."""
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="so400m_p14_384")
    ap.add_argument("--sizes", type=int, nargs="+", default=[384, 448])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--json", type=Path, help="also write the table's rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        hf_child(*json.loads(args.child))
        return
    from safetensors.torch import load_file

    from vision_tower.hardware import choose_precision

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    precision = choose_precision("auto", device)
    dtype = precision.dtype
    name = str(dtype).removeprefix("torch.")
    where = torch.cuda.get_device_name() if device == "cuda" else cpu_model()
    print(f"{where}; torch {torch.__version__}, {torch.get_num_threads()} threads; dtype auto: {name}")
    print(f"({precision.reason}); {args.preset}, block -2, no head, {args.images} photos, batch {args.batch}")
    print()
    columns = ["size", "tokens", "ours img/s", "transformers img/s", "ours / transformers"]
    columns += ["forward img/s (ours, theirs)", "matmul peak GFLOP/s", "forward share of peak"]
    columns += ["cosine to fp32 (ours, theirs)", "cosine ours-theirs"]
    print("| " + " | ".join(columns) + " |")
    print("|---" * 10 + "|")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="extract_bench_") as tmp:
        root = Path(tmp)
        files = photos(root / "photos", args.images)
        folder = tower_folder(args.preset, root / "tower")
        from vision_tower import VisionConfig

        base = VisionConfig.from_hf(json.loads((folder / "config.json").read_text()))
        for size in args.sizes:
            ours_out, hf_out = root / f"ours_{size}.safetensors", root / f"hf_{size}.safetensors"
            ours_cmd = [sys.executable, "-m", "vision_tower.cli", "extract", "--model", str(folder)]
            ours_cmd += ["--images", str(root / "photos"), "--out", str(ours_out), "--image-size", str(size)]
            ours_cmd += ["--layer", "-2", "--no-head", "--batch-size", str(args.batch), "--quiet"]
            ours_cmd += ["--device", device]
            child = json.dumps(
                [str(folder), str(root / "photos"), str(hf_out), size, args.batch, name, device]
            )
            ours_s, _ = timed(ours_cmd)
            hf_s, printed = timed([sys.executable, __file__, "--child", child])
            hf_forward = json.loads(printed.strip().splitlines()[-1])["forward_s"]
            ours_forward, reference = our_forward(folder, files, size, args.batch, dtype, device)
            tokens = (size // base.patch_size) ** 2
            flops = forward_flops(base, tokens)
            peak = matmul_peak_of(base, args.batch * tokens, dtype, device)
            ours_feats = load_file(ours_out)["patch_features"]
            hf_feats = load_file(hf_out)["patch_features"]
            n = args.images
            share = [n * flops / s / 1e9 / peak for s in (ours_forward, hf_forward)]
            rows.append(
                {
                    "size": size,
                    "tokens": tokens,
                    "ours_img_s": n / ours_s,
                    "transformers_img_s": n / hf_s,
                    "ours_forward_img_s": n / ours_forward,
                    "transformers_forward_img_s": n / hf_forward,
                    "matmul_peak_gflops": peak,
                    "forward_share_of_peak": share,
                    "cosine_to_fp32": [cosine(ours_feats, reference), cosine(hf_feats, reference)],
                }
            )
            print(
                f"| {size} | {tokens} | {n / ours_s:.3f} | {n / hf_s:.3f} | {hf_s / ours_s:.2f} | "
                f"{n / ours_forward:.3f}, {n / hf_forward:.3f} | {peak:.0f} | "
                f"{share[0]:.0%}, {share[1]:.0%} | "
                f"{cosine(ours_feats, reference):.5f}, {cosine(hf_feats, reference):.5f} | "
                f"{cosine(ours_feats, hf_feats):.5f} |"
            )
            sys.stdout.flush()
    if args.json:
        info = {
            "device": where,
            "dtype": name,
            "preset": args.preset,
            "images": args.images,
            "batch": args.batch,
        }
        args.json.write_text(json.dumps({**info, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
