"""Packing (``data.packing``) against one sample per row padded to the batch's longest, on a length-skewed
mix shaped like LLaVA-Instruct's: mostly short answers (VQA-style questions, captions), some single-turn
descriptions, and a tail of long multi-turn dialogues (the shares and lengths are flags; lengths are in
tokens of a word tokenizer, images a fixed number of tokens, as LLaVA's 576 but scaled with the model).

Both sides read the same samples, in the same order, through the training stream (``ShardDataset``: one
sample per row with ``batch_size`` samples a batch, or ``batch_size`` rows packed first-fit up to
``--max-length`` tokens) and collate them as ``train-vlm`` does; each batch then runs the training step's
forward and backward (targets-only head, loss over the batch's answer tokens) on a small random VLM (tiny
tower, linear connector, a Gemma-shaped decoder; the tower frozen). Printed per side: rows and steps, the
padding share of the rows' tokens, the steps' time, answer tokens (loss targets) per second and samples per
second, and the loss over all answer tokens (no optimizer step: both sides must give the same).

    python benchmarks/packing.py                          # 256 samples, batch 8, max length 512
    python benchmarks/packing.py --samples 64 --width 64   # a smoke run
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.tower_forward import cpu_model  # noqa: E402

VOCAB = 4096


class MixBuilder:
    """Samples of the mix as :class:`~training.data.vlm.VLMItem` (ids drawn at random in the lengths the
    raw sample names), collated by the VLM's own builder."""

    truncation_advice = ""

    def __init__(self, builder: Any, pixels: torch.Tensor, grid: Any, max_length: int) -> None:
        self.builder, self.pixels, self.grid, self.max_length = builder, pixels, grid, max_length
        self.pad_id = builder.pad_id

    def build(self, sample: dict[str, Any]) -> Any:
        from training.data.vlm import VLMItem

        rng = random.Random(sample["__key__"])
        image = [self.builder.image_token_id] * sample["image_tokens"]
        ids, targets = [1, *image], [False] * (1 + len(image))
        for user, reply in sample["turns"]:
            ids += [rng.randrange(8, VOCAB) for _ in range(user)]
            targets += [False] * user
            ids += [rng.randrange(8, VOCAB) for _ in range(reply)] + [2]
            targets += [True] * (reply + 1)
        cut = len(ids) > self.max_length
        ids, targets = ids[: self.max_length], targets[: self.max_length]
        first = targets.index(True)
        size = tuple(self.pixels.shape[-2:])
        return VLMItem(sample["__key__"], self.pixels, self.grid, [size], ids, first, "", "", cut, targets)

    def collate(self, items: list[Any]) -> dict[str, Any]:
        return self.builder.collate(items)


def mix(n: int, seed: int, args) -> list[dict[str, Any]]:
    """``n`` raw samples: a short answer (share ``--short``), a long single-turn description (``--medium``),
    or a dialogue of 3 to 8 turns (the rest)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.random()
        if kind < args.short:
            turns = [(rng.randint(8, 20), rng.randint(1, 12))]
        elif kind < args.short + args.medium:
            turns = [(rng.randint(10, 30), rng.randint(30, 120))]
        else:
            turns = [(rng.randint(8, 30), rng.randint(20, 80)) for _ in range(rng.randint(3, 8))]
        out.append(
            {"__key__": f"s{i:06d}", "__url__": "mix", "image_tokens": args.image_tokens, "turns": turns}
        )
    return out


def batches(samples, builder, batch_size: int, packer) -> list[dict[str, Any]]:
    """The training stream's batches of ``samples`` in order, one pass."""
    from training.data.stream import ShardDataset, ShardLoader

    def reader(url, counter):
        return iter(samples)

    # one process, one pass in order (the defaults)
    dataset = ShardDataset(["mix"], builder, batch_size=batch_size, reader=reader, packer=packer)
    return list(ShardLoader(dataset, num_workers=0))


def model(args) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    from connectors import VisionLanguageModel
    from training.demo.decoders import word_tokenizer
    from vision_tower import VisionTower

    side = int(args.image_tokens**0.5)
    if side * side != args.image_tokens:
        raise SystemExit(f"--image-tokens must be a square (a tower grid), got {args.image_tokens}")
    torch.manual_seed(0)
    tower = VisionTower.from_preset("tiny", use_head=False, image_size=8 * side)
    heads = max(1, args.width // 64)
    config = AutoConfig.for_model(
        "gemma",
        vocab_size=VOCAB + 8,
        hidden_size=args.width,
        intermediate_size=4 * args.width,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=64 if args.width >= 64 else args.width,
        max_position_embeddings=args.max_length,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    decoder = AutoModelForCausalLM.from_config(config)
    tokenizer = word_tokenizer([" ".join(f"w{i}" for i in range(VOCAB))])
    vlm = VisionLanguageModel(tower, "linear", decoder, attention=args.attention, tokenizer=tokenizer)
    vlm.set_trainable(tower=False, connector=True, decoder=True)
    return vlm.train()


def step(vlm, batch: dict[str, Any]) -> tuple[float, int]:
    """The training step's forward and backward; returns (loss sum over the answer tokens, their count)."""
    from training.tasks.vlm import model_inputs

    count = vlm.count_targets(
        batch["input_ids"], batch["labels"], batch["token_type_ids"], batch["attention_mask"]
    )
    loss = vlm(**model_inputs(batch), num_items_in_batch=count, targets_only=True).loss
    loss.backward()
    vlm.zero_grad(set_to_none=True)
    return float(loss.detach()) * count, count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="samples (padded) or rows (packed) a step")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--image-tokens", type=int, default=64, help="per image (a square: 8 px patches)")
    parser.add_argument("--short", type=float, default=0.6, help="share of short answers")
    parser.add_argument("--medium", type=float, default=0.25, help="share of long single-turn answers")
    parser.add_argument("--width", type=int, default=256, help="decoder width (4 layers by default)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--attention", default="causal", choices=["causal", "prefix"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("training.data.stream").setLevel(logging.ERROR)  # dialogues cut at --max-length
    from training.data.packing import RowPacker
    from training.data.vlm import builder_for

    vlm = model(args)
    builder = builder_for(vlm, max_length=args.max_length)
    size = vlm.tower.config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    source = MixBuilder(builder, pixels, vlm.grid, args.max_length)
    samples = mix(args.samples, 0, args)
    lengths = sorted(len(source.build(s).input_ids) for s in samples)
    print(
        f"{cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads, float32; decoder "
        f"width {args.width} x {args.layers} layers, {args.attention} attention, "
        f"{args.image_tokens} image tokens"
    )
    print(
        f"{len(samples)} samples, tokens per sample: median {lengths[len(lengths) // 2]}, 90th percentile "
        f"{lengths[len(lengths) * 9 // 10]}, max {lengths[-1]} (cut at {args.max_length})"
    )
    sides = {"padded": None, "packed": RowPacker(args.max_length)}
    results = {}
    for name, packer in sides.items():
        todo = batches(samples, source, args.batch_size, packer)
        step(vlm, todo[0])  # warm-up
        total, targets, seconds = 0.0, 0, 0.0
        for batch in todo:
            start = time.perf_counter()
            loss, count = step(vlm, batch)
            seconds += time.perf_counter() - start
            total, targets = total + loss, targets + count
        rows = sum(b["input_ids"].shape[0] for b in todo)
        slots = sum(b["input_ids"].numel() for b in todo)
        real = sum(int(b["attention_mask"].sum()) for b in todo)
        results[name] = (len(todo), rows, 1 - real / slots, seconds, targets, total / targets)
    print(
        f"\n{'':7} {'steps':>6} {'rows':>6} {'padding':>8} {'time s':>8} {'answer tok/s':>13} "
        f"{'samples/s':>10} {'loss':>9}"
    )
    for name, (steps, rows, pad, seconds, targets, loss) in results.items():
        print(
            f"{name:7} {steps:6d} {rows:6d} {pad:8.1%} {seconds:8.2f} {targets / seconds:13.0f} "
            f"{len(samples) / seconds:10.1f} {loss:9.5f}"
        )
    ratio = results["padded"][3] / results["packed"][3]
    print(f"\npacked / padded answer tokens per second: {ratio:.2f}x")


if __name__ == "__main__":
    main()
