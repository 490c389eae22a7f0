"""Peak RSS and wall time of building a VLM around a ~1B-parameter random decoder saved on disk, against
``AutoModelForCausalLM.from_pretrained`` of the decoder alone (and against the wasteful way: random init,
then a loaded state dict copied over it). Every measurement runs in a fresh process.

    python benchmarks/vlm_build_memory.py                 # writes ~9 GB under /tmp/vlm_build_memory
    python benchmarks/vlm_build_memory.py --layers 2      # a quick smoke run (~0.2B decoder)

Columns: the build's wall time, the same plus one read of every weight, the peak RSS. Rows: the decoder
alone; a VLM from a SigLIP so400m tower folder + "mlp2x_gelu" + the decoder folder; a VLM
from the PaliGemma export of that VLM and from its native export (``VisionLanguageModel.from_pretrained``);
the naive baseline. "over imports" is the peak RSS during the build (and one read of every weight:
transformers may leave
weights memory-mapped, which counts only once touched) minus the RSS before it (after importing torch and
transformers; the kernel's peak counter is reset there through /proc/self/clear_refs, Linux only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = (
    "decoder_alone",
    "vlm_around_decoder_folder",
    "vlm_from_paligemma",
    "vlm_from_native",
    "naive_init_then_load",
)


def _status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Make the peak RSS (VmHWM) restart from the current RSS, so import-time peaks do not count."""
    Path("/proc/self/clear_refs").write_text("5")


def decoder_config(layers: int):
    """Gemma-shaped: width 2048, MQA with 256-wide heads, MLP 8192, vocabulary 32000 (~0.97B at 15 layers)."""
    from transformers import GemmaConfig

    return GemmaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
    )


def prepare(work: Path, layers: int) -> None:
    """Random decoder (bf16 safetensors), so400m tower, and the VLM's PaliGemma and native exports."""
    import torch
    from transformers import AutoModelForCausalLM

    from connectors import VisionLanguageModel
    from vision_tower import VisionTower

    if (work / "native" / "config.json").exists():
        return
    dec = AutoModelForCausalLM.from_config(decoder_config(layers), dtype=torch.bfloat16)
    dec.save_pretrained(work / "decoder")
    tower = VisionTower.from_preset("so400m_p14_224", use_head=False).to(torch.bfloat16)
    tower.save_pretrained(work / "tower")
    vlm = VisionLanguageModel(tower, "linear", dec, image_token_id=31999, dtype=torch.bfloat16)
    vlm.save_pretrained(work / "paligemma", format="paligemma")
    vlm.save_pretrained(work / "native")


def child(mode: str, work: Path) -> dict:
    """Build one thing and report its peak RSS and time."""
    import torch
    import transformers  # noqa: F401  (imports count in the baseline)

    import connectors  # noqa: F401
    from connectors import VisionLanguageModel

    dtype = torch.bfloat16
    _reset_peak()
    base = _status_mb("VmRSS")
    start = time.perf_counter()
    if mode == "decoder_alone":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(work / "decoder", dtype=dtype)
    elif mode == "vlm_around_decoder_folder":
        # the decoder's last id serves as image placeholder (a reserved token): no embedding resize
        model = VisionLanguageModel(
            str(work / "tower"), "mlp2x_gelu", work / "decoder", image_token_id=31999, dtype=dtype
        )
    elif mode == "vlm_from_paligemma":
        model = VisionLanguageModel.from_pretrained(work / "paligemma", dtype=dtype)
    elif mode == "vlm_from_native":
        model = VisionLanguageModel.from_pretrained(work / "native", dtype=dtype)
    else:  # what the issue asks to avoid: materialise random weights, then copy the checkpoint over them
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(work / "decoder"), dtype=dtype)
        sd = load_file(work / "decoder" / "model.safetensors")
        model.load_state_dict(sd, strict=False)
        del sd
    seconds = time.perf_counter() - start
    with torch.no_grad():  # read every weight once: memory-mapped weights count only once touched
        for p in model.parameters():
            p.sum()
    touched = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return {
        "mode": mode,
        "seconds": seconds,
        "touched": touched,
        "peak_mb": _status_mb("VmHWM"),
        "imports_mb": base,
        "params": params,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vlm_build_memory"))
    ap.add_argument("--layers", type=int, default=15, help="decoder layers (15: ~0.97B parameters)")
    ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work / f"L{args.layers}")))
        return
    work = args.work / f"L{args.layers}"
    t = time.perf_counter()
    prepare(work, args.layers)
    print(f"prepared {work} in {time.perf_counter() - t:.0f}s")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    rows = []
    for mode in MODES:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--work",
                str(args.work),
                "--layers",
                str(args.layers),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode:
            raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    weights = sum(f.stat().st_size for f in (work / "decoder").glob("*.safetensors")) / 2**20
    print(f"decoder on disk: {weights:.0f} MiB (bf16); dtype requested: bfloat16")
    print(
        f"{'build':28s} {'params':>8s} {'build s':>8s} {'+ read s':>9s} {'peak RSS MiB':>13s} "
        f"{'over imports':>13s}"
    )
    for r in rows:
        over = r["peak_mb"] - r["imports_mb"]
        print(
            f"{r['mode']:28s} {r['params'] / 1e9:7.3f}B {r['seconds']:8.1f} {r['touched']:9.1f} "
            f"{r['peak_mb']:13.0f} {over:13.0f}"
        )


if __name__ == "__main__":
    main()
