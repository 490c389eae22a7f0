"""SigLIP two-tower pretraining under DeepSpeed ZeRO: shards in, evaluated and exported towers out."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from vision_tower import ImageProcessor, SiglipConfig, SiglipModel, Tokenizer

from . import checkpoints
from .config import PretrainConfig, resolve_path
from .engine import build_engine, init_distributed

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- model and data
def build_model(cfg: PretrainConfig) -> SiglipModel:
    """From a preset (with overrides) or a checkpoint; locks and activation checkpointing applied."""
    m = cfg.model
    model = SiglipModel.from_pretrained(m.init_from) if m.init_from else SiglipModel(m.model_config())
    if cfg.loss.kind == "softmax":
        model.logit_bias.requires_grad_(False)  # the softmax loss is invariant to b
    for locked, tower in ((m.lock_image, model.vision), (m.lock_text, model.text)):
        if locked:
            tower.requires_grad_(False)
            tower.eval()
    if m.gradient_checkpointing:
        model.vision.set_gradient_checkpointing(True)
        model.text.set_gradient_checkpointing(True)
    return model


def build_preprocessing(cfg: PretrainConfig, model: SiglipModel) -> tuple[ImageProcessor, Tokenizer]:
    size = cfg.data.image_size or model.vision.config.image_size
    if size != model.vision.config.image_size:
        model.vision.resize_pos_embed(size)
    source = cfg.data.tokenizer or cfg.model.init_from
    if source is None:
        raise ValueError(
            "data.tokenizer is required when training from a preset (a sentencepiece tokenizer folder)"
        )
    tokenizer = Tokenizer.from_pretrained(
        resolve_path(source), max_length=model.text.config.max_position_embeddings
    )
    if tokenizer.vocab_size > model.text.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the text tower only "
            f"{model.text.config.vocab_size}: set model.text.vocab_size"
        )
    return ImageProcessor(image_size=size), tokenizer


def build_train_loader(cfg: PretrainConfig, processor, tokenizer, rank: int, world: int, resume_state=None):
    from .data import TokenizeOne, build_dataset, build_loader

    dataset = build_dataset(
        resolve_path(cfg.data.train_shards),
        image_transform=processor,
        text_transform=TokenizeOne(tokenizer),
        batch_size=cfg.data.batch_size,
        seed=cfg.run.seed,
        rank=rank,
        world_size=world,
        resampled=True,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )
    return build_loader(dataset, num_workers=cfg.data.num_workers, resume_state=resume_state)


def make_loss_fn(cfg: PretrainConfig, world: int):
    """(img, txt, t', b) -> loss of this rank's rows; exact global-batch loss across ranks."""
    from .losses import sigmoid_loss, softmax_loss

    group = dist.group.WORLD if world > 1 else None
    max_scale = cfg.loss.logit_scale_max

    def loss_fn(img, txt, logit_scale, logit_bias):
        if max_scale is not None:
            logit_scale = logit_scale.clamp(max=max_scale)
        if cfg.loss.kind == "softmax":
            return softmax_loss(img.float(), txt.float(), logit_scale, group=group)
        return sigmoid_loss(
            img.float(), txt.float(), logit_scale, logit_bias, chunk_size=cfg.loss.chunk_size, group=group
        )

    return loss_fn


# ----------------------------------------------------------------------------- evaluation and export
def evaluate(model: SiglipModel, cfg: PretrainConfig, processor, tokenizer) -> dict[str, float]:
    """Zero-shot on ``data.zeroshot_dir`` and retrieval on ``data.val_shards`` (those that are set)."""
    from .evaluate import retrieval, zero_shot

    out: dict[str, float] = {}
    if cfg.data.zeroshot_dir:
        zs = zero_shot(
            model,
            resolve_path(cfg.data.zeroshot_dir),
            image_transform=processor,
            tokenize=tokenizer,
            batch_size=128,
        )
        out.update({"zeroshot_top1": zs["top1"], "zeroshot_top5": zs["top5"]})
    if cfg.data.val_shards:
        r = retrieval(
            model,
            resolve_path(cfg.data.val_shards),
            image_transform=processor,
            text_transform=tokenizer,
            batch_size=128,
        )
        out.update({k: v for k, v in r.items() if isinstance(v, float)})
    return out


def full_state_dict(module: torch.nn.Module, stage: int) -> dict[str, torch.Tensor]:
    """Every parameter in full on CPU (gathered under ZeRO-3), in the module's dtype; call on all ranks."""
    with _gathered(list(module.parameters()), stage):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def export(
    cfg: PretrainConfig,
    model_config: SiglipConfig,
    ckpt_dir: Path,
    tag: str,
    stage: int,
    processor,
    tokenizer,
    live_state: dict[str, torch.Tensor],
) -> Path:
    """Consolidated weights -> ``export/siglip`` (SiglipModel) and ``export/vision`` (SiglipVisionModel).

    Trainable parameters come from the fp32 master copy in the ZeRO checkpoint (stages 1-3);
    frozen ones (a locked tower) and stage 0 from the live module.
    """
    state = dict(live_state)
    if stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state.update(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))
    model = SiglipModel(model_config)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    out = Path(cfg.run.out_dir) / "export"
    for folder, part in (("siglip", model), ("vision", model.vision)):
        part.save_pretrained(out / folder)
        processor.save_pretrained(out / folder)
    tokenizer.save_pretrained(out / "siglip")
    return out


# ----------------------------------------------------------------------------- the loop
class MetricsLog:
    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the records up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                rows.append(line)
        except (json.JSONDecodeError, KeyError):
            continue  # a line cut off by a kill
    path.write_text("".join(r + "\n" for r in rows))


def _accumulated_step(engine, batches, loss_fn, accum: int, bf16: bool) -> torch.Tensor:
    """One optimizer step over ``accum`` micro-batches; returns their mean loss (this rank's)."""
    total = torch.zeros(())
    for _ in range(accum):
        batch = next(batches)
        pixels = batch["pixel_values"].to(engine.device, torch.bfloat16 if bf16 else torch.float32)
        loss = engine(pixels, batch["input_ids"].to(engine.device), loss_fn=loss_fn).loss
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
        total += loss.detach().float().cpu()
    return total / accum


def _mean_over_ranks(value: torch.Tensor, world: int) -> float:
    value = value.detach().float().reshape(1).cpu().clone()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return value.item()


def train(cfg: PretrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) a pretraining run; returns the final metrics on every rank."""
    rank, world = init_distributed()
    torch.manual_seed(cfg.run.seed)
    out = Path(cfg.run.out_dir)
    ckpt_dir = out / "checkpoints"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=list))
    model = build_model(cfg)
    processor, tokenizer = build_preprocessing(cfg, model)
    model_config = model.config
    engine, _, scheduler, ds_config = build_engine(model, cfg, world)
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    step, data_state = 0, None
    tag = checkpoints.latest(ckpt_dir) if resume else None
    if resume and tag is None and rank == 0:
        log.warning("--resume: no committed checkpoint in %s, starting from step 0", ckpt_dir)
    if tag is not None:
        step, data_state = checkpoints.load(engine, ckpt_dir, tag, rank, world)
    if rank == 0:
        _truncate_metrics(out / "metrics.jsonl", step)
    loader = build_train_loader(cfg, processor, tokenizer, rank, world, resume_state=data_state)
    metrics = MetricsLog(out / "metrics.jsonl", rank == 0)
    loss_fn = make_loss_fn(cfg, world)
    bf16 = bool(ds_config["bf16"]["enabled"])  # what the engine trains in
    bar = tqdm(
        total=cfg.run.steps,
        initial=step,
        disable=rank != 0,
        unit="step",
        desc="pretrain",
        mininterval=0.1 if sys.stderr.isatty() else 10.0,
    )
    images_per_step = cfg.data.batch_size * world * cfg.optim.grad_accum
    last: dict[str, Any] = {}
    batches = iter(loader)
    window = (step, time.perf_counter())  # (step, time) where the throughput window starts
    while step < cfg.run.steps:
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        loss = _accumulated_step(engine, batches, loss_fn, cfg.optim.grad_accum, bf16)
        step += 1
        if step % cfg.run.log_every == 0 or step == cfg.run.steps:
            with _gathered([engine.module.logit_scale, engine.module.logit_bias], stage):
                t = engine.module.logit_scale.detach().float().exp().item()
                b = engine.module.logit_bias.detach().float().item()
            ips = images_per_step * (step - window[0]) / (time.perf_counter() - window[1])
            last = {
                "step": step,
                "loss": _mean_over_ranks(loss, world),
                "t": t,
                "b": b,
                "lr": lr,
                "images_per_s": ips,
                "skipped": loader.skipped,
            }
            metrics.write(last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", t=f"{t:.2f}", b=f"{b:.2f}", ips=f"{ips:.0f}")
            window = (step, time.perf_counter())
        bar.update(1)
        if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step != cfg.run.steps:
            with _gathered([engine.module.logit_scale, engine.module.logit_bias], stage):
                metrics.write({"step": step, **evaluate(engine.module, cfg, processor, tokenizer)})
            window = (step, time.perf_counter())  # evaluation time is not training throughput
        if cfg.run.save_every and step % cfg.run.save_every == 0 and step != cfg.run.steps:
            checkpoints.save(engine, ckpt_dir, step, rank, loader.state_dict(), cfg.run.keep_checkpoints)
            window = (step, time.perf_counter())
    bar.close()
    final_tag_dir = checkpoints.save(
        engine, ckpt_dir, step, rank, loader.state_dict(), cfg.run.keep_checkpoints
    )
    result = {**last, "skip_counts": loader.skip_counts}
    with _gathered([engine.module.logit_scale, engine.module.logit_bias], stage):
        result.update(evaluate(engine.module, cfg, processor, tokenizer))
    live = full_state_dict(engine.module, stage)
    if rank == 0:
        result["export"] = str(
            export(cfg, model_config, ckpt_dir, final_tag_dir.name, stage, processor, tokenizer, live)
        )
        metrics.write({"step": step, "final": True, **result})
        _plot_loss(out / "metrics.jsonl", out / "loss.png")
    if dist.is_initialized():
        dist.barrier()
    return result


class _gathered:
    """Gather ZeRO-3 partitioned parameters for reading (no-op below stage 3)."""

    def __init__(self, params, stage: int) -> None:
        self.ctx = None
        if stage == 3:
            import deepspeed

            self.ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else False


def _plot_loss(metrics_file: Path, png: Path) -> None:
    """The loss curve as a PNG (skipped with a log line if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no loss plot")
        return
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    pts = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*pts))
    ax.set_xlabel("step")
    ax.set_ylabel("sigmoid loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def run_from_cli(config_path: str | None, overrides: list[str], resume: bool) -> dict[str, Any]:
    from .config import load_config

    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"))
    cfg = load_config(config_path, overrides)
    return train(cfg, resume=resume)
