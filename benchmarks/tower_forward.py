"""Forward speed of our image tower vs transformers' SiglipVisionModel on the same weights.

Both models hold identical weights (ours is loaded from the transformers state dict through the
real converter), run the same inputs in the same dtype under inference mode, and are timed
alternately so drift of the machine hits both alike. Prints images/s and the ratio ours/theirs
(> 1 means we are faster).

    python benchmarks/tower_forward.py                      # base/16 @224 (batch 8), so400m/14 @384 (batch 1)
    python benchmarks/tower_forward.py --cases base --repeats 20
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

CASES = {"base": ("b16_224", 8), "so400m": ("so400m_p14_384", 1)}  # preset, batch


def _time(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def run_case(name: str, repeats: int, dtype: torch.dtype, device: str) -> dict:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from vision_tower import VisionTower, get_preset

    preset, batch = CASES[name]
    hf_config = {k: v for k, v in get_preset(preset).vision.to_hf().items() if k != "model_type"}
    ref = SiglipVisionModel(SiglipVisionConfig(**hf_config)).eval()
    ours = VisionTower.from_state_dict(ref.state_dict(), ref.config.to_dict(), source=name).eval()
    ref.to(device=device, dtype=dtype)
    ours.to(device=device, dtype=dtype)
    size = hf_config["image_size"]
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def theirs(v):
        out = ref(v).pooler_output
        sync()
        return out

    def mine(v):
        out = ours(v).pooled
        sync()
        return out

    with torch.inference_mode():
        diff = (theirs(x).float() - mine(x).float()).abs().max().item()
        for _ in range(2):  # warm-up
            theirs(x)
            mine(x)
        t_ref, t_ours = [], []
        for _ in range(repeats):
            t_ref.append(_time(theirs, x))
            t_ours.append(_time(mine, x))
    ips_ref = batch / statistics.median(t_ref)
    ips_ours = batch / statistics.median(t_ours)
    return dict(
        case=name,
        batch=batch,
        size=size,
        ref=ips_ref,
        ours=ips_ours,
        ratio=ips_ours / ips_ref,
        diff=diff,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["base", "so400m"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, {args.dtype}, "
        f"median of {args.repeats}"
    )
    print(
        f"{'case':8} {'batch':>5} {'px':>4} {'transformers img/s':>19} {'ours img/s':>11} {'ratio':>6} {'max|diff|':>10}"
    )
    for name in args.cases:
        r = run_case(name, args.repeats, dtype, args.device)
        print(
            f"{r['case']:8} {r['batch']:5d} {r['size']:4d} {r['ref']:19.2f} {r['ours']:11.2f} "
            f"{r['ratio']:6.3f} {r['diff']:10.2e}"
        )


if __name__ == "__main__":
    main()
