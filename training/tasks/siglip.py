"""SigLIP two-tower pretraining as a runner task: shards in, evaluated and exported towers out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vision_tower import ImageProcessor, SiglipConfig, SiglipModel, Tokenizer
from vision_tower.checkpoint import build_and_load
from vision_tower.loading import read_siglip_weights
from vision_tower.text import TextTower
from vision_tower.vision import VisionTower

from ..data import shard_paths
from ..losses import clamp_logit_scale, get_loss
from ..runner.paths import local_paths, resolve_path
from ..runner.task import ExportContext
from ..runner.zero import Zero
from .shard_task import ShardTask
from .siglip_config import PretrainConfig


# ----------------------------------------------------------------------------- model
def build_model(cfg: PretrainConfig, zero: Zero | None = None) -> SiglipModel:
    """From a preset (with overrides) or a checkpoint, resized to ``data.image_size``; locks and
    activation checkpointing applied. At ZeRO-3 built partitioned (see :func:`_build_partitioned`)."""
    m = cfg.model
    if zero is not None and zero.stage == 3:
        model = _build_partitioned(cfg, zero)
    else:
        model = SiglipModel.from_pretrained(m.init_from) if m.init_from else SiglipModel(m.model_config())
        _resize(model.vision, cfg.data.image_size)
    if not get_loss(cfg.loss.kind).learns_bias:
        model.logit_bias.requires_grad_(False)  # the loss is invariant to b (softmax)
    for locked, tower in ((m.lock_image, model.vision), (m.lock_text, model.text)):
        if locked:
            tower.requires_grad_(False)
            tower.eval()
    if m.gradient_checkpointing:
        model.vision.set_gradient_checkpointing(True)
        model.text.set_gradient_checkpointing(True)
    return model


def _resize(vision: VisionTower, image_size: int | None) -> None:
    if image_size and image_size != vision.config.image_size:
        vision.resize_pos_embed(image_size)


def _build_partitioned(cfg: PretrainConfig, zero: Zero) -> SiglipModel:
    """One tower at a time: build it (random init, or ``model.init_from`` weights loaded strictly),
    partition it across the ranks, then the next, so no rank ever holds the whole model. The random
    init draws the same numbers in the same order as ``SiglipModel(config)``."""
    m = cfg.model
    weights = read_siglip_weights(m.init_from) if m.init_from else None
    config = weights.config if weights else m.model_config()
    with torch.device("meta"):
        model = SiglipModel(config)  # the skeleton; its parts are replaced below
    for name, cls in (("vision", VisionTower), ("text", TextTower)):
        part_config = getattr(config, name)
        if weights is None:
            tower = cls(part_config)
        else:
            prefix = f"{name}."
            sd = {
                k[len(prefix) :]: weights.state_dict.pop(k)
                for k in list(weights.state_dict)
                if k.startswith(prefix)
            }
            tower = build_and_load(lambda c=cls, p=part_config: c(p), sd, source=weights.source)
            del sd
        if name == "vision":
            _resize(tower, cfg.data.image_size)
        setattr(model, name, zero.partition(tower))
    for name in ("logit_scale", "logit_bias"):
        value = (
            weights.state_dict[name] if weights else torch.full((1,), float(getattr(config, f"{name}_init")))
        )
        setattr(model, name, nn.Parameter(value.detach().clone().float().reshape(1)))
    return zero.partition(model)  # t' and b


# ----------------------------------------------------------------------------- data and loss
def build_preprocessing(cfg: PretrainConfig, config: SiglipConfig) -> tuple[ImageProcessor, Tokenizer]:
    """The image processor at the tower's size and the tokenizer (checked against the text tower)."""
    source = cfg.data.tokenizer or cfg.model.init_from
    if source is None:
        raise ValueError(
            "data.tokenizer is required when training from a preset (a sentencepiece tokenizer folder)"
        )
    tokenizer = Tokenizer.from_pretrained(
        resolve_path(source), max_length=config.text.max_position_embeddings
    )
    if tokenizer.vocab_size > config.text.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the text tower only "
            f"{config.text.vocab_size}: set model.text.vocab_size"
        )
    return ImageProcessor(image_size=config.vision.image_size), tokenizer


def make_loss_fn(cfg: PretrainConfig, world: int):
    """(img, txt, t', b) -> loss of this rank's rows; exact global-batch loss across ranks."""
    loss = get_loss(cfg.loss.kind)  # its functional form, fed the model's own t' and b
    options = {"group": dist.group.WORLD if world > 1 else None}
    if loss.tiled:
        options["chunk_size"] = cfg.loss.chunk_size

    def loss_fn(img, txt, logit_scale, logit_bias):
        with torch.autocast(img.device.type, enabled=False):  # fp32 loss under run.precision bf16 autocast
            logit_scale = clamp_logit_scale(logit_scale, cfg.loss.logit_scale_max)
            bias = logit_bias if loss.learns_bias else None
            return loss.loss_function(img.float(), txt.float(), logit_scale, bias, **options)

    return loss_fn


# ----------------------------------------------------------------------------- the task
class SiglipTask(ShardTask):
    """``vision-tower pretrain``: the two towers, t' and b trained with the sigmoid (or softmax) loss."""

    name = "pretrain"
    sample_unit = "images"
    resume_free_keys = ("data.val_shards", "data.zeroshot_dir", "model.gradient_checkpointing")

    def __init__(self, cfg: PretrainConfig) -> None:
        super().__init__(cfg)
        self.loss_label = f"{cfg.loss.kind} loss"
        self.processor: ImageProcessor | None = None
        self.tokenizer: Tokenizer | None = None
        self.model_config: SiglipConfig | None = None
        self._loss_fn = None

    def input_paths(self) -> list[tuple[str, str]]:
        m, data = self.cfg.model, self.cfg.data
        keys = {"model.init_from": m.init_from, "data.tokenizer": data.tokenizer}
        return local_paths({**keys, "data.zeroshot_dir": data.zeroshot_dir}) + shard_paths(
            train_shards=data.train_shards and resolve_path(data.train_shards),
            val_shards=data.val_shards and resolve_path(data.val_shards),
        )

    def build_model(self, zero: Zero) -> SiglipModel:
        model = build_model(self.cfg, zero)
        self.model_config = model.config
        return model

    def build_loader(self, rank: int, world: int, resume_state: dict[str, Any] | None):
        """The training shards through the tower's image processor and the tokenizer (also kept for
        evaluation and export)."""
        from ..data import PairBuilder, TokenizeOne

        self.processor, self.tokenizer = build_preprocessing(self.cfg, self.model_config)
        return self.shard_loader(
            PairBuilder(self.processor, TokenizeOne(self.tokenizer)), rank, world, resume_state
        )

    def loss(self, engine: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        if self._loss_fn is None:
            self._loss_fn = make_loss_fn(self.cfg, dist.get_world_size() if dist.is_initialized() else 1)
        return engine(batch["pixel_values"], batch["input_ids"], loss_fn=self._loss_fn).loss

    def step_metrics(self, model: SiglipModel, zero: Zero) -> dict[str, float]:
        with zero.gathered([model.logit_scale, model.logit_bias]):
            return {
                "t": model.logit_scale.detach().float().exp().item(),
                "b": model.logit_bias.detach().float().item(),
            }

    def evaluate(self, model: SiglipModel, zero: Zero) -> dict[str, float]:
        """Zero-shot on ``data.zeroshot_dir`` (``zeroshot_top1``; ``zeroshot_top5`` with 6 classes or more)
        and
        retrieval on ``data.val_shards`` (those that are set)."""
        from ..eval.retrieval import retrieval
        from ..eval.zero_shot import zero_shot

        data, out = self.cfg.data, {}
        images = {"image_transform": self.processor, "batch_size": 128}
        with zero.gathered([model.logit_scale, model.logit_bias]):
            if data.zeroshot_dir:
                zs = zero_shot(model, resolve_path(data.zeroshot_dir), tokenize=self.tokenizer, **images)
                # top-5 only with enough classes for it to mean something (see zero_shot)
                out.update({f"zeroshot_{k}": zs[k] for k in ("top1", "top5") if k in zs})
            if data.val_shards:
                r = retrieval(model, resolve_path(data.val_shards), text_transform=self.tokenizer, **images)
                out.update({k: v for k, v in r.items() if isinstance(v, float)})
        return out

    def export(self, model: SiglipModel, ctx: ExportContext) -> str | None:
        """``export/siglip`` (transformers SiglipModel + tokenizer + processor) and ``export/vision``
        (SiglipVisionModel + processor) from the consolidated weights."""
        state = ctx.state_dict(model)
        if state is None:
            return None
        full = build_and_load(
            lambda: SiglipModel(model.config),
            {k: v.float() for k, v in state.items()},
            source=f"consolidated weights of {ctx.checkpoint}",
        )
        for folder, part in (("siglip", full), ("vision", full.vision)):
            needed = sum(t.numel() * t.element_size() for t in part.state_dict().values())
            with ctx.folder(folder, needed) as tmp:
                part.save_pretrained(tmp)
                self.processor.save_pretrained(tmp)
                if folder == "siglip":
                    self.tokenizer.save_pretrained(tmp)
        return str(Path(ctx.out_dir) / "export")
