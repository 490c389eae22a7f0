"""High resolution: tokens per image, prefill time and peak memory of the ``fixed``, ``anyres`` and
``anyres_max_9`` image layouts, ours against transformers on the same weights.

One VLM with random weights: a SigLIP tower (``--tower``, default so400m/14 at 384 px) read at block -2, the
``mlp2x_gelu`` connector and a Qwen2 decoder of Qwen2-0.5B's width and real 151,936-entry vocabulary,
reduced to ``--decoder-layers`` layers to fit the machine. It is exported once per layout in the format
transformers runs it in: ``fixed`` as LLaVA (``LlavaForConditionalGeneration``), ``anyres`` as LLaVA-NeXT
(``LlavaNextForConditionalGeneration``, LLaVA-NeXT 1.6's five grids) and ``anyres_max_9`` as
LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, grids up to 6x6 tiles). Each side prefills
one image and a short prompt, its inputs built its own way: ours with ``vlm.image_inputs`` and our prompt
layout, transformers' with ``AutoProcessor.from_pretrained(folder)``. Both return the last position's
logits; their largest difference is printed. Times: median of ``--repeats`` after a warm-up, the two sides
alternately. Peak memory: the RSS growth of one prefill in a fresh process holding only that model (CPU,
Linux VmHWM) or ``max_memory_allocated`` (CUDA).

    python benchmarks/highres.py                                  # so400m/14 at 384, CPU float32
    python benchmarks/highres.py --tower preset:tiny --repeats 3  # smoke run
    python benchmarks/highres.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.vlm_forward import _status_mb, parse_prefill_args  # noqa: E402

LAYOUTS = {"fixed": "llava", "anyres": "llava_next", "anyres_max_9": "llava_onevision"}
PROMPT = "<image> describe the picture in detail"


def image_sizes(tile: int) -> dict[str, tuple[int, int]]:
    """(height, width) of a square, a 2:1 landscape and a 1:3 document-like page, at twice the tile."""
    return {"square": (2 * tile, 2 * tile), "2:1": (2 * tile, 4 * tile), "1:3": (6 * tile, 2 * tile)}


def build(args, work: Path) -> dict[str, Path]:
    """The VLM with random weights, exported once per layout; returns layout -> folder."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from connectors import VisionLanguageModel
    from training.demo.decoders import word_tokenizer
    from vision_tower import ImageProcessor
    from vision_tower.sources import load_tower

    tokenizer = word_tokenizer([PROMPT.replace("<image>", "")])
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=args.decoder_layers,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    )
    torch.manual_seed(0)
    decoder = AutoModelForCausalLM.from_config(config)
    tower = load_tower(args.tower, use_head=False, feature_layer=-2)
    processor = ImageProcessor(image_size=tower.config.image_size)
    folders = {}
    for layout, fmt in LAYOUTS.items():
        vlm = VisionLanguageModel(
            tower,
            "mlp2x_gelu",
            decoder,
            tokenizer=tokenizer,
            processor=processor,
            attention="causal",
            image_layout=layout,
        )
        folders[layout] = work / layout
        vlm.save_pretrained(folders[layout], format=fmt)
    return folders


def load(impl: str, layout: str, folder: Path, dtype: torch.dtype, device: str):
    import transformers

    from connectors import VisionLanguageModel

    if impl == "ours":
        return VisionLanguageModel.from_pretrained(folder, dtype=dtype, device=device).eval()
    cls = json.loads((folder / "config.json").read_text())["architectures"][0]
    return getattr(transformers, cls).from_pretrained(folder, dtype=dtype).to(device).eval()


def image(size: tuple[int, int]):
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def inputs(impl: str, model, folder: Path, size: tuple[int, int], device: str, dtype: torch.dtype) -> dict:
    """One image of ``size`` and the prompt, as each side builds them."""
    if impl == "ours":
        from connectors.inputs import build_prompts

        pixels, sizes = model.image_inputs([image(size)])
        batch = build_prompts(
            model.tokenizer,
            [PROMPT],
            image_token_id=model.image_token_id,
            num_image_tokens=[model.tokens_for(size)],
            pad_token_id=0,
            causal=True,
        )
        return {
            "input_ids": batch.input_ids.to(device),
            "attention_mask": batch.attention_mask.to(device),
            "pixel_values": pixels.to(device, dtype),
            "image_sizes": sizes.to(device),
        }
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    out = processor(images=image(size), text=PROMPT, return_tensors="pt")
    batch = {k: v.to(device) for k, v in out.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


def prefill(model, batch: dict) -> torch.Tensor:
    return model(**batch, logits_to_keep=1).logits[:, -1]


def peak_child(impl: str, layout: str, folder: Path, size: tuple[int, int], dtype: torch.dtype) -> float:
    """CPU: peak RSS growth (MiB) of one prefill, in this (fresh) process, after a first one (which pages
    in the memory-mapped weights)."""
    model = load(impl, layout, folder, dtype, "cpu")
    batch = inputs(impl, model, folder, size, "cpu", dtype)
    with torch.inference_mode():
        prefill(model, batch)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS
    before = _status_mb("VmRSS")
    with torch.inference_mode():
        prefill(model, batch)
    return _status_mb("VmHWM") - before


def peak_mb(impl: str, layout: str, folder: Path, size, args, model, batch) -> float:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.inference_mode():
            prefill(model, batch)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    child = json.dumps([impl, layout, str(folder), list(size), args.dtype])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", child], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode:
        raise SystemExit(f"memory child failed:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def run(layout: str, folder: Path, name: str, size: tuple[int, int], args) -> dict:
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    models = {impl: load(impl, layout, folder, dtype, args.device) for impl in ("theirs", "ours")}
    batches = {impl: inputs(impl, m, folder, size, args.device, dtype) for impl, m in models.items()}
    tokens = {impl: int(b["input_ids"].shape[1]) for impl, b in batches.items()}
    if tokens["ours"] != tokens["theirs"]:
        raise SystemExit(f"{layout} {size}: {tokens['ours']} tokens ours, {tokens['theirs']} transformers'")
    crops = batches["ours"]["pixel_values"].shape[0]
    times: dict[str, list[float]] = {"theirs": [], "ours": []}
    with torch.inference_mode():
        diff = float(
            (prefill(models["ours"], batches["ours"]) - prefill(models["theirs"], batches["theirs"]))
            .abs()
            .max()
        )
        for i in range(args.warmup + args.repeats):
            for impl, model in models.items():
                start = time.perf_counter()
                prefill(model, batches[impl])
                sync()
                if i >= args.warmup:
                    times[impl].append(time.perf_counter() - start)
    ms = {impl: 1e3 * statistics.median(t) for impl, t in times.items()}
    mem = {impl: peak_mb(impl, layout, folder, size, args, models[impl], batches[impl]) for impl in models}
    tokens = models["ours"].tokens_for(size)
    return dict(layout=layout, image=name, size=size, crops=crops, tokens=tokens, ms=ms, mem=mem, diff=diff)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tower", default="preset:so400m_p14_384", help="preset:NAME (random weights) or tower")
    ap.add_argument("--decoder-layers", type=int, default=2)
    ap.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    args = parse_prefill_args(ap, repeats=2, warmup=1)
    if args.child:
        impl, layout, folder, size, dtype = json.loads(args.child)
        print(peak_child(impl, layout, Path(folder), tuple(size), getattr(torch, dtype)))
        return
    from benchmarks.tower_forward import cpu_model

    print(
        f"{cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
        f"{args.dtype}; tower {args.tower}, Qwen2 decoder of {args.decoder_layers} layers (width 896, "
        f"vocabulary 151936); prefill of one image + prompt, median of {args.repeats}"
    )
    head = f"{'layout':13} {'image':7} {'HxW':>10} {'crops':>5} {'tokens':>6} {'transformers ms':>15}"
    print(head + f" {'ours ms':>8} {'speed-up':>8} {'transformers MiB':>16} {'ours MiB':>9} {'max|diff|':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        folders = build(args, Path(tmp))
        from vision_tower import VisionConfig

        tile = VisionConfig.from_hf(
            json.loads((folders["fixed"] / "config.json").read_text())["vision_config"]
        ).image_size
        for layout in args.layouts:
            for name, size in image_sizes(tile).items():
                r = run(layout, folders[layout], name, size, args)
                ms, mem = r["ms"], r["mem"]
                print(
                    f"{layout:13} {name:7} {size[0]:>4}x{size[1]:<5} {r['crops']:5d} {r['tokens']:6d} "
                    f"{ms['theirs']:15.1f} {ms['ours']:8.1f} {ms['theirs'] / ms['ours']:8.2f} "
                    f"{mem['theirs']:16.1f} {mem['ours']:9.1f} {r['diff']:9.1e}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
