"""One markdown table from the JSON that ``benchmarks/gpu.sh`` has the three comparisons write: the VLM
training step against transformers' PaliGemma, the SigLIP pretraining step against open_clip, and
``vision-tower extract`` against transformers' processor + model loop.

    python benchmarks/gpu_table.py --vlm vlm.json --pretrain pretrain.json --extract extract.json \
        --tests "6 passed in 41.2s" > table.md
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

COLUMNS = [
    "comparison",
    "shape",
    "ours",
    "theirs",
    "ours' time / theirs",
    "memory, ours / theirs",
    "agreement",
]


def vlm_rows(data: dict) -> list[list[str]]:
    rows = []
    for r in data["results"]:
        ours, theirs = r["impls"]["ours, logits at targets"], r["impls"]["transformers PaliGemma"]
        rows.append(
            [
                f"VLM step, stage {r['stage']}, vs `PaliGemmaForConditionalGeneration`",
                f"{r['size']}: {r['rows']} rows of {r['length']} tokens, "
                f"{data['answer']}-token answers, fp32",
                f"{ours['step_s'] * 1e3:.1f} ms",
                f"{theirs['step_s'] * 1e3:.1f} ms",
                f"{ours['step_s'] / theirs['step_s']:.2f}x",
                f"{ours['peak_mib']:,.1f} / {theirs['peak_mib']:,.1f} MiB "
                f"({ours['peak_mib'] / theirs['peak_mib']:.2f}x)",
                f"losses differ by {abs(ours['loss'] - theirs['loss']):.1e}",
            ]
        )
    return rows


def pretrain_rows(data: dict) -> list[list[str]]:
    ours, theirs = data["results"][0], data["results"][1]
    assert ours["side"] == "ours" and theirs["side"] == "open_clip", [r["side"] for r in data["results"]]
    return [
        [
            "SigLIP pretraining step vs open_clip `ViT-B-16-SigLIP` + `SigLipLoss`",
            f"B/16-224, batch {data['batch']}, {ours['precision']}",
            f"{ours['step_s'] * 1e3:.1f} ms",
            f"{theirs['step_s'] * 1e3:.1f} ms",
            f"{ours['step_s'] / theirs['step_s']:.2f}x",
            f"{ours['peak_gib']:.2f} / {theirs['peak_gib']:.2f} GiB "
            f"({ours['peak_gib'] / theirs['peak_gib']:.2f}x)",
            f"first losses differ by {abs(ours['first_loss'] - theirs['first_loss']):.1e}",
        ]
    ]


def extract_rows(data: dict) -> list[list[str]]:
    rows = []
    for r in data["rows"]:
        share = r["forward_share_of_peak"]
        rows.append(
            [
                "`vision-tower extract` vs `AutoImageProcessor` + `SiglipVisionModel` loop",
                f"{data['preset']} at {r['size']} px ({r['tokens']} tokens), block -2, "
                f"{data['images']} photos, "
                f"batch {data['batch']}, {data['dtype']}; forward at {share[0]:.0%} / {share[1]:.0%} of "
                f"{r['matmul_peak_gflops']:,.0f} GFLOP/s",
                f"{r['ours_img_s']:.1f} img/s",
                f"{r['transformers_img_s']:.1f} img/s",
                f"{r['transformers_img_s'] / r['ours_img_s']:.2f}x",
                "",
                f"cosine to fp32 {r['cosine_to_fp32'][0]:.5f} / {r['cosine_to_fp32'][1]:.5f}",
            ]
        )
    return rows


def table(vlm: dict | None, pretrain: dict | None, extract: dict | None, tests: str) -> str:
    device = next(d["device"] for d in (extract, pretrain, vlm) if d is not None)
    import torch

    lines = [f"Device: {device}; torch {torch.__version__}, Python {platform.python_version()}.", ""]
    lines += [f"`pytest -m gpu`: {tests}", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    rows = []
    for data, make in ((vlm, vlm_rows), (pretrain, pretrain_rows), (extract, extract_rows)):
        if data is not None:
            rows += make(data)
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("vlm", "pretrain", "extract"):
        ap.add_argument(f"--{name}", type=Path, help=f"the {name} comparison's --json output")
    ap.add_argument("--tests", default="not run", help="pytest's summary line for the gpu-marked tests")
    args = ap.parse_args()
    loaded = {n: json.loads(p.read_text()) if p else None for n, p in vars(args).items() if n != "tests"}
    if not any(loaded.values()):
        ap.error("give at least one of --vlm, --pretrain, --extract")
    print(table(loaded["vlm"], loaded["pretrain"], loaded["extract"], args.tests), end="")


if __name__ == "__main__":
    main()
