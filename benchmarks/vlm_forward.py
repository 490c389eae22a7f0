"""Prefill of one image plus a 32-token prompt: our VisionLanguageModel vs transformers on the same weights.

Two rows per size:
  - ``paligemma``: our VLM (linear connector, prefix attention, tower output after the post-layernorm)
    against ``PaliGemmaForConditionalGeneration`` loaded from our PaliGemma export;
  - ``layer -2``: our VLM reading tower block -2 (the blocks above it and the post-layernorm are skipped)
    against ``LlavaForConditionalGeneration`` loaded from our LLaVA export (its tower runs at full depth and
    keeps every hidden state).
Both sides load the same files, run the same inputs under inference mode and are timed alternately (median
of ``--repeats`` after warm-up). Peak memory: on CUDA ``max_memory_allocated`` during the prefill; on CPU the
peak RSS growth of one prefill in a fresh process that holds only that model (Linux VmHWM).

    python benchmarks/vlm_forward.py                          # tiny and ~300M, float32, CPU
    python benchmarks/vlm_forward.py --sizes tiny --repeats 3   # smoke run
    python benchmarks/vlm_forward.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPT = 32  # text tokens after the image: bos + 31


# size -> (tower preset, gemma decoder of one key/value head: the numbers of _GEMMA_FIELDS)
_GEMMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "head_dim",
)
_SIZES = {
    "tiny": ("tiny", (300, 64, 128, 2, 4, 16)),
    # ~300M in all: B/16 tower at 224 px (86M, 196 tokens) + a 12-layer Gemma of width 1024 (212M)
    "300m": ("b16_224", (32000, 1024, 4096, 12, 8, 128)),
    # Gemma's real 256k vocabulary on a small body: where the logits, not the layers, take the memory
    "256k": ("tiny", (256000, 256, 512, 2, 4, 64)),
    # PaliGemma's shapes (so400m/14 at 224 px: 256 image tokens, at 448 px: 1024) with Gemma 2B's width and
    # 256k vocabulary, its decoder cut to 2 of 18 layers to fit a CPU machine
    "pg224": ("so400m_p14_224", (256000, 2048, 16384, 2, 8, 256)),
    "pg448": ("so400m_p14_224@448", (256000, 2048, 16384, 2, 8, 256)),
}


def _sizes() -> dict:
    """size -> (tower preset, decoder config of the gemma family)."""
    from transformers import GemmaConfig

    return {
        size: (preset, GemmaConfig(**dict(zip(_GEMMA_FIELDS, shape, strict=True)), num_key_value_heads=1))
        for size, (preset, shape) in _SIZES.items()
    }


def export(size: str, work: Path) -> dict[str, Path]:
    """Random weights of ``size`` exported once as PaliGemma (layer -1, prefix) and LLaVA (layer -2,
    causal)."""
    from transformers import AutoModelForCausalLM

    from connectors import VisionLanguageModel
    from vision_tower import VisionTower

    preset, dec_cfg = _sizes()[size]
    torch.manual_seed(0)
    decoder = AutoModelForCausalLM.from_config(dec_cfg)
    preset, _, size_px = preset.partition("@")  # NAME@PX: the preset's tower at another resolution
    tower = VisionTower.from_preset(
        preset, use_head=False, **({"image_size": int(size_px)} if size_px else {})
    )
    vlm = VisionLanguageModel(tower, "linear", decoder, image_token_id=dec_cfg.vocab_size - 1)
    out = {"paligemma": work / f"{size}-paligemma", "layer -2": work / f"{size}-llava"}
    vlm.save_pretrained(out["paligemma"], format="paligemma")
    vlm.tower.feature_layer, vlm.attention = -2, "causal"
    vlm.save_pretrained(out["layer -2"], format="llava")
    return out


def load(row: str, impl: str, folder: Path, dtype: torch.dtype, device: str):
    from transformers import LlavaForConditionalGeneration, PaliGemmaForConditionalGeneration

    from connectors import VisionLanguageModel

    if impl == "ours":
        return VisionLanguageModel.from_pretrained(folder, dtype=dtype, device=device).eval()
    cls = PaliGemmaForConditionalGeneration if row == "paligemma" else LlavaForConditionalGeneration
    return cls.from_pretrained(folder, dtype=dtype).to(device).eval()


def inputs(folder: Path, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    cfg = json.loads((folder / "config.json").read_text())
    side = cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]
    vocab = cfg["text_config"]["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(3, vocab - 1, (1, PROMPT - 1), generator=gen)
    ids = torch.cat([torch.full((1, side * side), cfg["image_token_index"]), torch.tensor([[2]]), text], 1)
    size = cfg["vision_config"]["image_size"]
    pixels = torch.randn(1, 3, size, size, generator=gen)
    return {
        "input_ids": ids.to(device),
        "pixel_values": pixels.to(device, dtype),
        "attention_mask": torch.ones_like(ids).to(device),
        "token_type_ids": torch.zeros_like(ids).to(device),
    }


def prefill(model, batch: dict, row: str) -> torch.Tensor:
    from connectors import VisionLanguageModel

    if isinstance(model, VisionLanguageModel) or row == "paligemma":
        return model(**batch).logits
    return model(**{k: v for k, v in batch.items() if k != "token_type_ids"}).logits


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def peak_child(row: str, impl: str, folder: Path, dtype: torch.dtype) -> float:
    """CPU: peak RSS growth (MiB) of one prefill, in this (fresh) process."""
    model = load(row, impl, folder, dtype, "cpu")
    batch = inputs(folder, "cpu", dtype)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS
    before = _status_mb("VmRSS")
    with torch.inference_mode():
        prefill(model, batch, row)
    return _status_mb("VmHWM") - before


def peak_mb(row: str, impl: str, folder: Path, args, models: dict, batch: dict) -> float:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            prefill(models[impl], batch, row)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [sys.executable, __file__, "--child", json.dumps([row, impl, str(folder), args.dtype])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"memory child failed:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def run_row(size: str, row: str, folder: Path, args) -> dict:
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    models = {impl: load(row, impl, folder, dtype, args.device) for impl in ("theirs", "ours")}
    batch = inputs(folder, args.device, dtype)
    times: dict[str, list[float]] = {"theirs": [], "ours": []}
    with torch.inference_mode():
        diff = (
            (prefill(models["ours"], batch, row).float() - prefill(models["theirs"], batch, row).float())
            .abs()
            .max()
        )
        for i in range(args.warmup + args.repeats):
            for impl, model in models.items():
                start = time.perf_counter()
                prefill(model, batch, row)
                sync()
                if i >= args.warmup:
                    times[impl].append(time.perf_counter() - start)
    ms = {impl: 1e3 * statistics.median(t) for impl, t in times.items()}
    mem = {impl: peak_mb(row, impl, folder, args, models, batch) for impl in models}
    tokens = batch["input_ids"].shape[1]
    return dict(size=size, row=row, tokens=tokens, ms=ms, mem=mem, diff=float(diff))


def parse_prefill_args(ap: argparse.ArgumentParser, *, repeats: int, warmup: int) -> argparse.Namespace:
    """The options every prefill comparison takes (timing, dtype, device, the hidden ``--child`` of a
    memory measurement in its own process), parsed, with transformers' warnings quietened."""
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return args


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", choices=list(_SIZES), default=["tiny", "300m"])
    args = parse_prefill_args(ap, repeats=10, warmup=2)
    if args.child:
        row, impl, folder, dtype = json.loads(args.child)
        print(peak_child(row, impl, Path(folder), getattr(torch, dtype)))
        return
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, {args.dtype}; "
        f"1 image + {PROMPT} prompt tokens, median of {args.repeats}"
    )
    head = f"{'size':5} {'row':10} {'tokens':>6} {'transformers ms':>15} {'ours ms':>8} {'speed-up':>8} "
    print(head + f"{'transformers MiB':>16} {'ours MiB':>9} {'max|diff|':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for row, folder in export(size, Path(tmp)).items():
                r = run_row(size, row, folder, args)
                ms, mem = r["ms"], r["mem"]
                print(
                    f"{size:5} {row:10} {r['tokens']:6d} {ms['theirs']:15.2f} {ms['ours']:8.2f} "
                    f"{ms['theirs'] / ms['ours']:8.2f} {mem['theirs']:16.1f} {mem['ours']:9.1f} "
                    f"{r['diff']:9.1e}"
                )


if __name__ == "__main__":
    main()
