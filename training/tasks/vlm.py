"""Staged training of a vision-language model as a runner task (``vision-tower train-vlm``): stage
``text`` trains the decoder alone as a language model on the samples' text (no image is read), stage
``align`` trains the connector between a frozen tower and a frozen decoder, stage ``finetune`` the
connector and the decoder (in full or through LoRA), the tower if asked. Batches of image + prompt +
answer from shards (or cached tower features), loss on the answer tokens, held-out loss and exact
match, exports in the native and, where they can hold the model, PaliGemma / LLaVA layouts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from connectors import VisionLanguageModel

from ..data import check_shard_specs, expand_shards, shard_paths
from ..data.chat import resolve_chat_template
from ..data.json_source import JsonSource
from ..data.packing import RowPacker
from ..data.vlm import VLMBuilder, builder_for
from ..runner import ExportContext, train
from ..runner.config import resolve_path
from ..runner.paths import local_paths
from ..runner.zero import Zero
from .shard_task import ShardTask
from .vlm_config import VLMConfig, template_file
from .vlm_model import (
    StageModel,
    build_stage_model,
    check_vocabulary,
    load_plain,
    lora_scaling,
    merge_lora,
)

__all__ = ["VLMTask", "model_inputs", "train_vlm"]
log = logging.getLogger(__name__)
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "labels",
    "pixel_values",
    "patch_features",
    "image_sizes",
    "position_ids",  # packed rows: positions restart at each sample
)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The VLM's keyword arguments in a batch of :class:`~training.data.vlm.VLMBuilder` (texts left out)."""
    out = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "patch_features" in out:
        out["grid"] = batch["grid"]
    return out


class VLMTask(ShardTask):
    """One stage of VLM training; ``cfg.stage`` says which parts train."""

    sample_unit = "samples"
    loss_label = "next-token loss (answer tokens)"
    resume_free_keys = (
        "data.val_shards",
        "data.val_json",
        "data.val_image_folder",
        "data.eval_samples",
        "data.eval_batch_size",
        "data.eval_max_new_tokens",
        "model.gradient_checkpointing",
        "data.max_bad_samples",
        "export",
    )

    def __init__(self, cfg: VLMConfig) -> None:
        super().__init__(cfg)
        self.name = f"vlm {cfg.stage}"
        if cfg.data.packing:  # data.batch_size counts rows of several samples; throughput is in rows
            self.sample_unit = "rows"
        if cfg.data.feature_cache:  # a missing or unreadable cache fails before any set-up
            from ..data.feature_cache import FeatureCache

            FeatureCache(resolve_path(cfg.data.feature_cache))
        self.stage: StageModel | None = None
        self.loader = None
        self._eval: tuple[VLMBuilder, list] | None = None

    def check_inputs(self) -> None:
        """The shards (ShardTask) or the JSON file and image folder, the chat template file, then a tokenizer
        with ids past the decoder's embedding table: all fail before DeepSpeed starts."""
        data = self.cfg.data
        if data.train_json or data.sources:
            check_shard_specs(val_shards=data.val_shards and resolve_path(data.val_shards))
            _check_path("data.train_json", data.train_json, Path.is_file, "file")
            _check_path("data.image_folder", data.image_folder, Path.is_dir, "folder")
            for k, source in enumerate(data.sources or ()):
                name = f"data.sources[{k}]"
                if source.get("train_shards"):
                    try:
                        check_shard_specs(train_shards=resolve_path(source["train_shards"]))
                    except (OSError, ValueError) as err:
                        raise type(err)(f"{name}: {err}") from None
                _check_path(f"{name}.train_json", source.get("train_json"), Path.is_file, "file")
                _check_path(f"{name}.image_folder", source.get("image_folder"), Path.is_dir, "folder")
        else:
            super().check_inputs()
        _check_path("data.val_json", data.val_json, Path.is_file, "file")
        _check_path("data.val_image_folder", data.val_image_folder, Path.is_dir, "folder")
        if template_file(self.cfg.model.chat_template):
            _check_path("model.chat_template", self.cfg.model.chat_template, Path.is_file, "file")
        check_vocabulary(self.cfg.model)

    def input_paths(self) -> list[tuple[str, str]]:
        m, data = self.cfg.model, self.cfg.data
        parts = {f"model.{k}": getattr(m, k) for k in ("init_from", "tower", "decoder", "tokenizer")}
        keys = ("feature_cache", "train_json", "image_folder", "val_json", "val_image_folder")
        files = {f"data.{k}": getattr(data, k) for k in keys}
        shards = {}
        for k, source in enumerate(data.sources or ()):
            files |= {f"data.sources[{k}].{key}": source.get(key) for key in ("train_json", "image_folder")}
            if source.get("train_shards"):
                shards[f"sources[{k}].train_shards"] = resolve_path(source["train_shards"])
        return local_paths({**parts, **files}) + shard_paths(
            train_shards=data.train_shards and resolve_path(data.train_shards),
            val_shards=data.val_shards and resolve_path(data.val_shards),
            **shards,
        )

    @property
    def vlm(self) -> VisionLanguageModel:
        if self.stage is None:
            raise RuntimeError("build_model has not run")
        return self.stage.vlm

    def build_model(self, zero: Zero) -> VisionLanguageModel:
        dtype = torch.bfloat16 if zero.ds_config["bf16"]["enabled"] else torch.float32
        self.stage = build_stage_model(self.cfg, zero, dtype)
        template = self.cfg.model.chat_template
        if template is not None:  # the model carries it: the exports save it, eval and generate read it back
            spec = resolve_path(template) if template_file(template) else template
            self.stage.vlm.chat_template = resolve_chat_template(spec, self.stage.vlm.tokenizer)
        data = self.cfg.data  # a data.max_length that leaves no room for text fails before the engine starts
        builder_for(
            self.stage.vlm,
            max_length=data.max_length,
            max_image_tokens=data.max_image_tokens,
            caption_prompt=data.caption_prompt,
        )
        return self.stage.vlm

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Decayed and not decayed trainable parameters; the tower's in groups of their own at
        ``finetune.tower_lr``. Frozen parameters are in none (no optimizer state)."""
        groups = super().param_groups(model)
        lr = self.cfg.finetune.tower_lr
        if self.cfg.tower_trains and lr is not None:
            tower = {id(p) for p in self.vlm.tower.parameters()}
            split = []
            for g in groups:
                split.append({**g, "params": [p for p in g["params"] if id(p) not in tower]})
                split.append({**g, "params": [p for p in g["params"] if id(p) in tower], "lr": lr})
            groups = split
        return [g for g in groups if g["params"]]

    def build_loader(self, rank: int, world: int, resume_state: dict[str, Any] | None):
        data = self.cfg.data
        images = None
        if data.feature_cache:
            from ..data.feature_cache import FeatureCache

            images = FeatureCache(resolve_path(data.feature_cache))
            images.check_shards(expand_shards(resolve_path(data.train_shards)))
        builder = self.builder(images)
        limits = {"template_mismatch": data.max_bad_samples}
        source = None
        if data.sources:
            from ..data.mixture import build_mixture

            source = build_mixture(data.sources, resolve_path)
        elif data.train_json:
            json_file = resolve_path(data.train_json)
            source = JsonSource(json_file, data.image_folder and resolve_path(data.image_folder))
        packer = RowPacker(data.max_length, data.max_images_per_row) if data.packing else None
        self.loader = self.shard_loader(
            builder, rank, world, resume_state, skip_limits=limits, source=source, packer=packer
        )
        return self.loader

    def builder(self, images: Any = None) -> VLMBuilder:
        """The model's builder; conversations rendered with the model's chat template
        (``model.chat_template``, set on the model by :meth:`build_model`, else the tokenizer's own)."""
        data = self.cfg.data
        return builder_for(
            self.vlm,
            max_length=data.max_length,
            max_image_tokens=data.max_image_tokens,
            caption_prompt=data.caption_prompt,
            images=images,
            text_only=self.cfg.stage == "text",
        )

    def loss(
        self, engine: nn.Module, batch: dict[str, Any], num_items_in_batch: float | None = None
    ) -> torch.Tensor:
        # lm_head only where a target is: not on the image tokens, the prompt and the padding
        return engine(**model_inputs(batch), num_items_in_batch=num_items_in_batch, targets_only=True).loss

    def loss_items(self, batch: dict[str, Any]) -> int:
        """The answer tokens the batch's loss is over (the runner normalises by their global count)."""
        return self.vlm.count_targets(
            batch["input_ids"], batch["labels"], batch.get("token_type_ids"), batch.get("attention_mask")
        )

    def evaluate(self, model: nn.Module, zero: Zero) -> dict[str, float]:
        """Loss and exact match on the first ``data.eval_samples`` usable samples of ``data.val_shards`` or
        ``data.val_json`` (in file order), if set."""
        from ..eval.vlm import evaluate_vlm, read_eval_items

        data = self.cfg.data
        if not (data.val_shards or data.val_json):
            return {}
        if self._eval is None:
            builder = self.builder()
            self._eval = (builder, read_eval_items(builder, self._held_out(), data.eval_samples))
        builder, items = self._eval
        result = evaluate_vlm(
            model,
            items,
            builder,
            batch_size=data.eval_batch_size,
            max_new_tokens=data.eval_max_new_tokens,
            fixed_length=zero.stage == 3,
        )
        return result.metrics()

    def _held_out(self) -> Any:
        """``data.val_shards`` (resolved), or ``data.val_json`` with its image folder as a JSON source."""
        data = self.cfg.data
        if data.val_shards:
            return resolve_path(data.val_shards)
        folder = data.val_image_folder and resolve_path(data.val_image_folder)
        keys = ("data.val_json", "data.val_image_folder")
        return JsonSource(resolve_path(data.val_json), folder, keys=keys)

    def export(self, model: nn.Module, ctx: ExportContext) -> str | None:
        """``export/<format>`` for each format that holds the model, from the consolidated weights with
        LoRA adapters merged."""
        state = ctx.state_dict(model)
        if state is None:
            return None
        if self.cfg.stage == "finetune" and self.cfg.finetune.decoder == "lora":
            state = merge_lora(state, lora_scaling(self.cfg.finetune.lora))
        plain = load_plain(self.vlm, state)
        out = Path(ctx.out_dir) / "export"
        needed = sum(t.numel() * t.element_size() for t in plain.state_dict().values())
        for fmt in self.stage.formats:
            with ctx.folder(fmt, needed) as tmp:
                plain.save_pretrained(tmp, format=fmt)
        log.info("exported %s to %s", ", ".join(self.stage.formats), out)
        return str(out)


def _check_path(key: str, path: str | None, test: Any, kind: str) -> None:
    if path and not test(Path(resolve_path(path))):
        raise FileNotFoundError(f"{key} {path} is not a {kind}")


def train_vlm(cfg: VLMConfig, *, resume: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) one stage; returns the final metrics on every rank."""
    return train(VLMTask(cfg), resume=resume, overwrite=overwrite)
