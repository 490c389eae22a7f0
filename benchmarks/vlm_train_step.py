"""One VLM training step (forward and backward of a caption batch): logits only where the loss is
(``targets_only``, what ``train-vlm`` runs) against logits everywhere (ours, ``targets_only=False``) and
against transformers' ``PaliGemmaForConditionalGeneration`` given ``labels`` (which projects every position
of every row, image tokens and prompt included, onto the vocabulary).

All three load the same PaliGemma export (random weights, see ``vlm_forward.py`` for the sizes) and run the
same batch: ``--batch`` rows of one image, bos, an 8-token prompt and a ``--answer``-token answer, the loss on
the answer. The step time is the median of ``--repeats`` after a warm-up, the three timed alternately; the
peak is the RSS growth of a second step in a fresh process holding only that model (the first step read
every weight and made the optimizer state), or ``max_memory_allocated`` (CUDA). The losses of the three are
printed too (they must agree). ``--stage align`` freezes tower and decoder; the connector's AdamW step is
timed with the rest.

    python benchmarks/vlm_train_step.py                       # tiny and ~300M, float32, CPU
    python benchmarks/vlm_train_step.py --sizes tiny --repeats 2
    python benchmarks/vlm_train_step.py --sizes pg224 pg448 --stage align --batch 2 --answer 32 \
        --skip-everywhere                                     # PaliGemma shapes, stage align
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.vlm_forward import _status_mb, export  # noqa: E402

PROMPT = 8
IMPLS = ("ours, logits at targets", "ours, logits everywhere", "transformers PaliGemma")


def batch_for(folder: Path, rows: int, answer: int, device: str) -> dict[str, torch.Tensor]:
    cfg = json.loads((folder / "config.json").read_text())
    vision = cfg["vision_config"]
    side = vision["image_size"] // vision["patch_size"]
    vocab = cfg["text_config"]["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(3, vocab - 1, (rows, PROMPT + answer), generator=gen)
    image = torch.full((rows, side * side), cfg["image_token_index"])
    ids = torch.cat([image, torch.full((rows, 1), 2), text], 1)  # (B, L)
    types = torch.zeros_like(ids)
    types[:, -answer:] = 1
    labels = ids.masked_fill(types == 0, -100)  # the loss on the answer only, for transformers too
    pixels = torch.randn(rows, 3, vision["image_size"], vision["image_size"], generator=gen)
    tensors = {"input_ids": ids, "token_type_ids": types, "labels": labels, "pixel_values": pixels}
    return {k: v.to(device) for k, v in tensors.items()}


def load(impl: str, folder: Path, device: str):
    from transformers import PaliGemmaForConditionalGeneration

    from connectors import VisionLanguageModel

    if impl.startswith("ours"):
        return VisionLanguageModel.from_pretrained(folder, dtype=torch.float32, device=device).train()
    return PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).to(device).train()


def freeze_for_align(model, impl: str) -> torch.optim.Optimizer:
    """Stage align: only the connector (transformers: ``multi_modal_projector``) trains; its AdamW."""
    trained = model.connector if impl.startswith("ours") else model.model.multi_modal_projector
    model.requires_grad_(False)
    trained.requires_grad_(True)
    return torch.optim.AdamW(trained.parameters(), lr=1e-4)


def step(model, impl: str, batch: dict, optimizer: torch.optim.Optimizer | None = None) -> float:
    """Forward and backward (and the optimizer's step when there is one); returns the loss."""
    if impl.startswith("ours"):
        out = model(
            batch["input_ids"],
            batch["pixel_values"],
            torch.ones_like(batch["input_ids"]),
            batch["token_type_ids"],
            batch["labels"],
            targets_only=impl == IMPLS[0],
        )
    else:
        out = model(**batch)
    out.loss.backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return float(out.loss.detach())


def peak_child(impl: str, folder: Path, rows: int, answer: int, stage: str = "full") -> float:
    """CPU: the peak RSS growth (MiB) of one step, in this (fresh) process."""
    model = load(impl, folder, "cpu")
    optimizer = freeze_for_align(model, impl) if stage == "align" else None
    batch = batch_for(folder, rows, answer, "cpu")
    # a first step reads every weight (transformers may leave them memory-mapped, counted once touched) and
    # makes the optimizer's state; the second step's growth is what a step holds: activations and gradients
    step(model, impl, batch, optimizer)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM restarts from the current RSS
    before = _status_mb("VmRSS")
    step(model, impl, batch, optimizer)
    return _status_mb("VmHWM") - before


def peak_mb(impl: str, folder: Path, args, model, batch, optimizer=None) -> float:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(model, impl, batch, optimizer)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    code = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "from benchmarks.vlm_train_step import peak_child; "
        "print(peak_child(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]))"
    )
    cmd = [sys.executable, "-c", code, str(ROOT), impl, str(folder), str(args.batch), str(args.answer)]
    cmd.append(args.stage)
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", nargs="+", default=["tiny", "300m"], choices=["tiny", "300m", "256k", "pg224", "pg448"]
    )
    parser.add_argument(
        "--stage",
        choices=["full", "align"],
        default="full",
        help="full: every part gets gradients, no optimizer step; align: the connector trains, with AdamW",
    )
    parser.add_argument(
        "--skip-everywhere", action="store_true", help="leave out ours with logits everywhere"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--answer", type=int, default=24, help="answer tokens per row (the loss is on them)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = []
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, float32")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as work:
            folder = export(size, Path(work))["paligemma"]
            impls = [i for i in IMPLS if not (args.skip_everywhere and i == IMPLS[1])]
            models = {impl: load(impl, folder, args.device) for impl in impls}
            optims = {i: freeze_for_align(m, i) if args.stage == "align" else None for i, m in models.items()}
            batch = batch_for(folder, args.batch, args.answer, args.device)
            losses = {impl: step(models[impl], impl, batch, optims[impl]) for impl in impls}  # warm-up
            times: dict[str, list[float]] = {impl: [] for impl in impls}
            for _ in range(args.repeats):
                for impl in impls:
                    start = time.perf_counter()
                    step(models[impl], impl, batch, optims[impl])
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times[impl].append(time.perf_counter() - start)
            if args.device.startswith("cuda"):
                peaks = {i: peak_mb(i, folder, args, models[i], batch, optims[i]) for i in impls}
            else:  # in fresh processes, one model each
                del models, optims
                peaks = {i: peak_mb(i, folder, args, None, batch) for i in impls}
            rows, length = batch["input_ids"].shape
            print(
                f"\n{size}, stage {args.stage}: {rows} rows of {length} tokens, {args.answer} answer tokens"
            )
            ref = IMPLS[-1]
            results.append({"size": size, "stage": args.stage, "rows": rows, "length": length, "impls": {}})
            for impl in impls:
                results[-1]["impls"][impl] = {
                    "step_s": statistics.median(times[impl]),
                    "peak_mib": peaks[impl],
                    "loss": losses[impl],
                }
                t = statistics.median(times[impl])
                print(
                    f"  {impl:<26} step {t * 1e3:8.1f} ms ({t / statistics.median(times[ref]):.2f}x "
                    f"transformers)  peak +{peaks[impl]:8.1f} MiB ({peaks[impl] / peaks[ref]:.2f}x)  "
                    f"loss {losses[impl]:.6f}"
                )
    if args.json:
        where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        args.json.write_text(
            json.dumps({"device": where, "answer": args.answer, "results": results}, indent=1)
        )


if __name__ == "__main__":
    main()
