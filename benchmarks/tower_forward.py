"""Forward speed of our image tower vs transformers' SiglipVisionModel on the same weights, in fp32 and
bf16, eager and under torch.compile, side by side in one run.

Both models hold identical weights (ours is loaded from the transformers state dict through the real
converter), run the same inputs under inference mode, and are timed alternately so drift of the machine
hits both alike. Each mode (dtype x eager/compiled) times transformers, ours (pooled output, every
block and the head) and ours at feature_layer=-2 without head (the LLaVA features: one block less, no
head). Both models are compiled the same way (``torch.compile(fn)``, default settings).

The fraction of the matmul peak is achieved GFLOP/s (the model's matmul and convolution FLOPs per image,
counted from its config, times images/s) over the GFLOP/s of a large square matmul in the same dtype,
measured in the same run. Ratios > 1 mean ours is faster.

    python benchmarks/tower_forward.py                                    # base/16 @224, batch 8, all modes
    python benchmarks/tower_forward.py --cases base so400m --repeats 20
    python benchmarks/tower_forward.py --cases tiny --modes bf16-compiled # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import statistics
import time
from dataclasses import dataclass

import torch

CASES = {"tiny": ("tiny", 8), "base": ("b16_224", 8), "so400m": ("so400m_p14_384", 1)}  # preset, batch
MODES = {  # name: (dtype, compiled)
    "fp32-eager": (torch.float32, False),
    "bf16-eager": (torch.bfloat16, False),
    "bf16-compiled": (torch.bfloat16, True),
    "fp32-compiled": (torch.float32, True),
}


def vit_flops(cfg, blocks: int | None = None, head: bool = True) -> float:
    """Multiply-add FLOPs (x2) of one image through the patch conv, ``blocks`` blocks and the MAP head."""
    n, d, i = cfg.num_patches, cfg.hidden_size, cfg.intermediate_size
    blocks = cfg.num_hidden_layers if blocks is None else blocks
    per_block = 2 * n * d * (3 * d + d + 2 * i) + 2 * 2 * n * n * d  # qkv, proj, MLP; q@k.T and attn@v
    total = 2 * n * 3 * cfg.patch_size**2 * d + blocks * per_block
    if head and cfg.use_head:
        total += 2 * n * d * 2 * d + 2 * 2 * n * d + 2 * d * (2 * d + 2 * i)  # kv, attention, q/proj/MLP
    return float(total)


def matmul_peak(dtype: torch.dtype, device: str, n: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of an n x n x n matmul in ``dtype`` (best of ``repeats``)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


@dataclass
class Row:
    mode: str
    ref: float  # images/s, transformers
    ours: float
    ours_l2: float  # feature_layer=-2, no head
    diff: float  # max |pooled ours - pooled transformers|


def _median_rate(fn, x, batch: int, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def run_mode(ref, ours, ours_l2, x, mode: str, repeats: int, device: str) -> Row:
    dtype, compiled = MODES[mode]
    ref, ours, ours_l2 = (copy.deepcopy(m).to(device=device, dtype=dtype) for m in (ref, ours, ours_l2))
    fns = [lambda v: ref(v).pooler_output, lambda v: ours(v).pooled, lambda v: ours_l2(v).patch_features]
    if compiled:
        fns = [torch.compile(f) for f in fns]
    x = x.to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.inference_mode():
        diff = (fns[0](x).float() - fns[1](x).float()).abs().max().item()  # compiles, if compiled
        for f in fns:
            f(x)
            f(x)  # warm-up
        rates = [[], [], []]
        for _ in range(repeats):  # alternate, so that drift of the machine hits all alike
            for k, f in enumerate(fns):
                rates[k].append(_median_rate(f, x, len(x), 1, sync))
    ref_r, ours_r, l2_r = (statistics.median(r) for r in rates)
    return Row(mode, ref_r, ours_r, l2_r, diff)


def run_case(name: str, modes: list[str], repeats: int, device: str, peaks: dict) -> list[Row]:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from vision_tower import VisionTower, get_preset

    preset, batch = CASES[name]
    cfg = get_preset(preset).vision
    hf_config = {k: v for k, v in cfg.to_hf().items() if k != "model_type"}
    ref = SiglipVisionModel(SiglipVisionConfig(**hf_config)).eval()
    ours = VisionTower.from_state_dict(ref.state_dict(), ref.config.to_dict(), source=name).eval()
    ours_l2 = VisionTower.from_state_dict(
        ref.state_dict(), ref.config.to_dict(), source=name, feature_layer=-2, use_head=False
    ).eval()
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    full, l2 = vit_flops(cfg), vit_flops(cfg, cfg.num_hidden_layers - 1, head=False)
    print(
        f"\n{name}: preset {preset}, batch {batch}, {cfg.image_size} px, {full / 1e9:.1f} GFLOP/image "
        f"({l2 / 1e9:.1f} at layer -2 without head)"
    )
    print(
        f"{'mode':14} {'transformers':>12} {'ours':>8} {'ours/tf':>7} {'ours L-2':>8} "
        f"{'peak tf':>7} {'peak ours':>9} {'peak L-2':>8} {'max|diff|':>9}   (images/s; % of matmul peak)"
    )
    rows = []
    for mode in modes:
        r = run_mode(ref, ours, ours_l2, x, mode, repeats, device)
        peak = peaks[MODES[mode][0]]
        pct = [
            100 * rate * flops / 1e9 / peak
            for rate, flops in ((r.ref, full), (r.ours, full), (r.ours_l2, l2))
        ]
        print(
            f"{mode:14} {r.ref:12.2f} {r.ours:8.2f} {r.ours / r.ref:7.2f} {r.ours_l2:8.2f} "
            f"{pct[0]:6.1f}% {pct[1]:8.1f}% {pct[2]:7.1f}% {r.diff:9.2e}",
            flush=True,
        )
        rows.append(r)
    by = {r.mode: r for r in rows}
    for a, b in (
        ("bf16-compiled", "bf16-compiled"),
        ("bf16-compiled", "fp32-eager"),
        ("fp32-compiled", "fp32-compiled"),
    ):
        if a in by and b in by:
            print(f"  ours {a} / transformers {b}: {by[a].ours / by[b].ref:.2f}x")
    return rows


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["base"])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from vision_tower.hardware import choose_precision, cpu_flags

    flags = sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx", "avx2")))
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(
        f"{where}; flags {' '.join(flags) or '-'}; torch {torch.__version__}, {torch.get_num_threads()} "
        "threads, "
        f"median of {args.repeats}; {choose_precision('auto', args.device).describe()}"
    )
    peaks = {dtype: matmul_peak(dtype, args.device) for dtype in {MODES[m][0] for m in args.modes}}
    print(
        "matmul peak (4096^3): "
        + ", ".join(f"{str(d)[6:]} {p:.0f} GFLOP/s" for d, p in peaks.items())
        + (f"; bf16/fp32 {peaks[torch.bfloat16] / peaks[torch.float32]:.2f}" if len(peaks) == 2 else "")
    )
    for name in args.cases:
        run_case(name, args.modes, args.repeats, args.device, peaks)


if __name__ == "__main__":
    main()
