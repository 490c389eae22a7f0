"""Small shard sets, a word tokenizer, a tiny tower and a tiny decoder (saved folders) for the VLM
training tests: shapes captions (``txt``) plus a shard of prompt/answer samples (``json``)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from connectors import ConnectorConfig
from tests.helpers.shards import write_tar
from tests.helpers.vlm_workers import losses as logged_losses
from training.data.vlm import PixelImages, VLMBuilder
from training.demo import caption_corpus
from training.demo.decoders import save_decoder, word_tokenizer
from training.demo.shapes import make_sample, make_shapes
from vision_tower import ImageProcessor, VisionTower

QA_PROMPT = "what colour is the shape"
IMAGE_SIZE = 32


def layout_for(connector, image_size: int, patch_size: int, name: str = "fixed", **options):
    """The image layout ``name`` of a model whose tower takes ``image_size`` px in ``patch_size`` px patches
    and whose connector is ``connector`` (a :class:`~connectors.ConnectorConfig`, built on the meta
    device): what a :class:`~training.data.vlm.VLMBuilder` counts tokens with, without a model."""
    from connectors.layouts import CropShape, build_layout

    with torch.device("meta"):
        built = connector.build()
    side = image_size // patch_size
    return build_layout(name, CropShape.of(built, (image_size, image_size), (side, side)), **options)


PROCESSOR16 = ImageProcessor(image_size=16)
SHUFFLE = ConnectorConfig("pixel_shuffle", 8, 16, {"factor": 2})  # 4 tokens from a 4x4 grid


def pixel_builder(tok, *, max_length: int = 40, connector=SHUFFLE, **options) -> VLMBuilder:
    """A :class:`VLMBuilder` of 16 px images in 4 px patches (a 4x4 grid: 4 tokens after ``SHUFFLE``)
    with the caption prompt "caption"; ``options`` go to the builder (``causal``, ``chat_template``)."""
    layout = layout_for(connector, 16, 4)
    return VLMBuilder(
        tok,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        layout=layout,
        images=PixelImages(PROCESSOR16, layout, patch_size=4),
        max_length=max_length,
        caption_prompt="caption",
        **options,
    )


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def qa_members(n: int, start: int = 0, split: str = "train") -> list[tuple[str, bytes]]:
    """Shapes images with ``json`` {prompt: QA_PROMPT, answer: the colour}."""
    out = []
    for i in range(start, start + n):
        s = make_sample(split, i, image_size=IMAGE_SIZE)
        out.append((f"qa{i:05d}.png", png(s.image)))
        out.append((f"qa{i:05d}.json", json.dumps({"prompt": QA_PROMPT, "answer": s.color}).encode()))
    return out


SIZED = ((24, 60), (64, 40), (90, 90))  # (height, width) of the sized shard's images in turn


def sized_qa_members(n: int) -> list[tuple[str, bytes]]:
    """Prompt/answer samples as :func:`qa_members`, their images resized to the sizes of :data:`SIZED` in
    turn (wide, tall, larger than 2x2 tiles of a 32 px tower): what tiled image layouts cut differently."""
    out = []
    for i in range(n):
        s = make_sample("train", i, image_size=64)
        height, width = SIZED[i % len(SIZED)]
        out.append((f"sz{i:05d}.png", png(s.image.resize((width, height)))))
        out.append((f"sz{i:05d}.json", json.dumps({"prompt": QA_PROMPT, "answer": s.color}).encode()))
    return out


def texts() -> list[str]:
    """Every word the data holds: the tokenizer's vocabulary."""
    return [*caption_corpus(), QA_PROMPT, "USER: ASSISTANT:"]


def make_assets(root: Path, *, n_train: int = 192, n_val: int = 24) -> dict[str, str]:
    """Shards (``train/`` of captions and one prompt/answer shard, ``val/``, ``sized/``: 48 prompt/answer
    samples of :data:`SIZED` images), the tokenizer, a tiny tower and a 2-layer Gemma-shaped decoder (width
    64) saved as folders."""
    make_shapes(
        root / "data",
        n_train=n_train,
        n_val=n_val,
        shard_size=64,
        image_size=IMAGE_SIZE,
        zeroshot_per_class=1,
    )
    write_tar(root / "data" / "train" / "qa-000.tar", qa_members(48))
    write_tar(root / "data" / "sized" / "sized-000.tar", sized_qa_members(48))
    tok = word_tokenizer(texts())
    tok.save_pretrained(root / "tokenizer")
    torch.manual_seed(7)
    save_decoder(root / "decoder", "tiny_gemma", tok)
    torch.manual_seed(8)
    VisionTower.from_preset("tiny", use_head=False).save_pretrained(root / "tower")
    return {
        "train": str(root / "data" / "train"),
        "val": str(root / "data" / "val"),
        "sized": str(root / "data" / "sized"),
        "tokenizer": str(root / "tokenizer"),
        "decoder": str(root / "decoder"),
        "tower": str(root / "tower"),
    }


# the swap tests' second tower: another width and patch size than the tiny preset's (64 wide, 8 px patches)
TOWER_B = {"hidden_size": 48, "intermediate_size": 96, "patch_size": 16}


def make_swap_assets(root: Path, *, n_train: int = 256, n_val: int = 48) -> dict[str, str]:
    """Prompt/answer shards only (``train/``, held-out ``val/``: what colour is the shape), the word
    tokenizer, and two random towers: ``tower_a`` of the tiny preset and ``tower_b`` of :data:`TOWER_B`."""
    write_tar(root / "train" / "qa-000.tar", qa_members(n_train))
    write_tar(root / "val" / "qa-000.tar", qa_members(n_val, split="val"))
    word_tokenizer(texts()).save_pretrained(root / "tokenizer")
    torch.manual_seed(8)
    VisionTower.from_preset("tiny", use_head=False).save_pretrained(root / "tower_a")
    torch.manual_seed(9)
    VisionTower.from_preset("tiny", use_head=False, **TOWER_B).save_pretrained(root / "tower_b")
    return {
        "train": str(root / "train"),
        "val": str(root / "val"),
        "tokenizer": str(root / "tokenizer"),
        "tower_a": str(root / "tower_a"),
        "tower_b": str(root / "tower_b"),
    }


def conversation_record(split: str, i: int, image: str) -> dict:
    """LLaVA's record of a two-turn conversation about shapes sample ``i``: its colour, then its shape."""
    s = make_sample(split, i, image_size=IMAGE_SIZE)
    return {
        "id": f"{split}-{i}",
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{QA_PROMPT}"},
            {"from": "gpt", "value": s.color},
            {"from": "human", "value": "and its shape"},
            {"from": "gpt", "value": s.shape},
        ],
    }


def make_conversation_assets(root: Path, *, n_train: int = 48, n_val: int = 8) -> dict[str, str]:
    """A JSON Lines file of LLaVA conversation records with their images in a folder (``train``,
    ``images``), held-out shards of the same records (``val``) and the same held-out records as JSON Lines
    with their folder (``val_json``, ``val_images``), a word tokenizer that holds LLaVA's v1
    template's words, a tiny tower and a 2-layer Gemma-shaped decoder, saved as folders."""
    from training.data.chat import V1

    images = root / "images"
    images.mkdir(parents=True)
    with open(root / "train.jsonl", "w") as f:
        for i in range(n_train):
            (images / f"{i:05d}.png").write_bytes(png(make_sample("train", i, image_size=IMAGE_SIZE).image))
            f.write(json.dumps(conversation_record("train", i, f"{i:05d}.png")) + "\n")
    members, lines = [], []
    (root / "val_images").mkdir()
    for i in range(n_val):
        image = png(make_sample("val", i, image_size=IMAGE_SIZE).image)
        members.append((f"v{i:05d}.png", image))
        members.append((f"v{i:05d}.json", json.dumps(conversation_record("val", i, "x.png")).encode()))
        (root / "val_images" / f"v{i:05d}.png").write_bytes(image)
        lines.append(json.dumps(conversation_record("val", i, f"v{i:05d}.png")))
    write_tar(root / "val" / "val-000.tar", members)
    (root / "val.jsonl").write_text("\n".join(lines) + "\n")
    system = V1.split("{% else %}")[1].split("{%")[0]  # the v1 system prompt's words
    tok = word_tokenizer([*texts(), system, "USER: ASSISTANT: and its shape"])
    tok.save_pretrained(root / "tokenizer")
    torch.manual_seed(7)
    save_decoder(root / "decoder", "tiny_gemma", tok)
    torch.manual_seed(8)
    VisionTower.from_preset("tiny", use_head=False).save_pretrained(root / "tower")
    return {k: str(root / k) for k in ("images", "val", "val_images", "tokenizer", "decoder", "tower")} | {
        "train": str(root / "train.jsonl"),
        "val_json": str(root / "val.jsonl"),
    }


def conversation_model_keys(assets: dict[str, str]) -> dict[str, str]:
    """The config overrides that point ``configs/vlm/tiny_conversations.yaml`` at the assets of
    :func:`make_conversation_assets`: its tower, decoder (with its tokenizer) and training JSON Lines."""
    return {
        "model.tower": assets["tower"],
        "model.decoder": assets["decoder"],
        "model.tokenizer": "null",
        "data.train_json": assets["train"],
        "data.image_folder": assets["images"],
    }


def run_train_vlm(config: Path | str, values: dict[str, object], timeout: float = 240) -> None:
    """``vision-tower train-vlm --config CONFIG key=value...`` as a user runs it (one process, from the
    repository root); its output in the failure message."""
    import subprocess
    import sys

    from training.runner.launch import launch_env
    from training.runner.paths import ROOT

    cmd = [sys.executable, "-m", "vision_tower.cli", "train-vlm", "--config", str(config)]
    cmd += [f"{k}={v}" for k, v in values.items()]
    proc = subprocess.run(cmd, env=launch_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def train_and_check_the_loss_falls(config: Path | str, values: dict[str, object], out: Path, steps: int = 6):
    """Run ``train-vlm`` (:func:`run_train_vlm`) for ``steps`` steps at lr 3e-2 into ``out``, exporting the
    native folder only; every step logs a loss and the last is below the first. The run's metrics records."""
    run_train_vlm(
        config,
        {**values, "run.steps": steps, "run.out_dir": out, "optim.lr": 3e-2, "export.formats": "[native]"},
    )
    losses = logged_losses(str(out))
    assert len(losses) == steps and losses[-1] < losses[0], losses
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
