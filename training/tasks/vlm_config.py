"""The typed config of ``vision-tower train-vlm``: a ``stage`` and one section per component (``model``,
``data``, ``finetune``, ``export``) plus the runner's ``optim`` and ``run``, loaded strictly from YAML
with ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..runner.config import OptimSection, RunSection, check_range, load_sections, resolve_path

# text: the decoder alone learns the data's text (no image); align: the connector; finetune: the
# connector and the decoder
STAGES = ("text", "align", "finetune")
DECODER_TRAINING = ("full", "lora")
EXPORT_FORMATS = (
    "native",
    "paligemma",
    "llava",
    "llava_next",
    "llava_onevision",
    "idefics3",
    "smolvlm",
    "gemma3",
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# what a saved VLM (model.init_from) keeps, and what a tower swap (init_from with tower) may set
_KEPT = ("decoder", "decoder_options", "tokenizer", "attention")
_SWAP = ("image_size", "feature_layer", "connector", "connector_options", "keep_connector")


@dataclass
class VLMModelSection:
    """What to train: a saved VLM (``init_from``: any of the native, PaliGemma or LLaVA layouts, e.g. the
    previous stage's ``export/native``), a saved VLM with its tower swapped (``init_from`` and ``tower``),
    or a tower, a connector and a decoder put together.

    ``tower``: a folder, file, hub id or ``preset:NAME``, resized to ``image_size``, read at
    ``feature_layer`` (default -1; in a swap, the saved VLM's). ``connector`` (registered name; default
    ``linear``, in a swap the saved VLM's kind rebuilt for the new width) with ``connector_options``; in a
    swap ``keep_connector`` keeps the saved connector's weights instead (the new tower must be as wide).
    ``decoder``: a causal LM folder or hub id, or ``preset:NAME`` (random weights of a registered shape,
    ``decoder_options`` overriding its config, sized to the tokenizer); ``tokenizer``: a folder (default:
    the decoder's). A swap keeps the saved decoder, tokenizer, image token and attention.
    ``chat_template`` renders conversation samples: ``plain`` (LLaVA's pretraining layout), ``v1`` (LLaVA's
    conversation layout), a Jinja file, or None for the tokenizer's own template (with ``init_from``: the
    saved VLM's, the one it was trained with); the model keeps it and every export saves it.
    ``image_layout`` (a registered name: ``fixed``, ``anyres``, ``anyres_max``, ``anyres_max_9``, ``split``,
    ``pan_and_scan``) with ``layout_options`` (``grid_pinpoints``, ``max_tiles``; ``longest_edge``;
    ``max_num_crops`` ...): how an image becomes crops and decoder tokens;
    default ``fixed``, and with ``init_from`` the saved VLM's. Set with ``init_from`` it replaces the saved
    layout (LLaVA-NeXT's stage 2: a ``fixed`` stage 1, then ``anyres``): learned parameters the new layout
    shares with the saved one by name and shape (``image_newline``) are kept, others start fresh.
    """

    init_from: str | None = None
    tower: str | None = None
    image_size: int | None = None
    feature_layer: int | None = None
    connector: str | None = None
    connector_options: dict[str, Any] = field(default_factory=dict)
    keep_connector: bool = False
    decoder: str | None = None
    decoder_options: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    attention: str = "prefix"
    gradient_checkpointing: bool = False  # tower blocks and decoder layers
    chat_template: str | None = (
        None  # conversations: plain, v1 (LLaVA's), a Jinja file; None: the tokenizer's
    )
    image_layout: str | None = None  # None: fixed, or with init_from the saved VLM's layout
    layout_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from connectors import list_connectors
        from connectors.decoder_presets import DECODER_PRESETS, preset_decoder_name
        from connectors.inputs import ATTENTION
        from connectors.layouts import list_layouts

        defaults = VLMModelSection.__dataclass_fields__
        if self.connector is not None and self.connector not in list_connectors():
            raise ValueError(
                f"model.connector {self.connector!r} is unknown; known: {', '.join(list_connectors())}"
            )
        check_range("model.image_size", self.image_size, lo=1)
        if self.image_layout is not None and self.image_layout not in list_layouts():
            raise ValueError(
                f"model.image_layout {self.image_layout!r} is unknown; known: {', '.join(list_layouts())}"
            )
        if self.layout_options and self.image_layout is None:
            raise ValueError(
                "model.layout_options are options of model.image_layout: set it too (e.g. anyres)"
            )
        from ..data.chat import BUILTIN_TEMPLATES

        spec = self.chat_template
        if spec is not None and spec not in BUILTIN_TEMPLATES and not template_file(spec):
            raise ValueError(
                f"model.chat_template {spec!r}: give a built-in ({', '.join(BUILTIN_TEMPLATES)}) or a Jinja "
                "file (.jinja, .j2)"
            )
        if self.init_from is not None:
            kept = [k for k in _KEPT if getattr(self, k) != _default(defaults[k])]
            if kept:
                raise ValueError(
                    "model.init_from holds the decoder, its tokenizer and attention (a swap keeps them): "
                    f"drop model.{', model.'.join(kept)}"
                )
            swap = [k for k in _SWAP if getattr(self, k) != _default(defaults[k])]
            if swap and not self.tower:
                raise ValueError(
                    f"model.{', model.'.join(swap)} apply to a tower swap: set model.tower (the new tower) "
                    "or drop them (model.init_from holds tower and connector)"
                )
            if self.keep_connector and (self.connector is not None or self.connector_options):
                raise ValueError(
                    "model.keep_connector keeps the saved connector: drop model.connector and "
                    "model.connector_options"
                )
            return
        if self.keep_connector:
            raise ValueError(
                "model.keep_connector applies to a tower swap (model.init_from with model.tower)"
            )
        if not self.tower or not self.decoder:
            raise ValueError("model: set init_from (a saved VLM), or tower and decoder (to build one)")
        self.connector = self.connector or "linear"
        self.image_layout = self.image_layout or "fixed"
        self.feature_layer = -1 if self.feature_layer is None else self.feature_layer
        if self.attention not in ATTENTION:
            raise ValueError(f"model.attention must be one of {ATTENTION}, got {self.attention!r}")
        preset = preset_decoder_name(self.decoder)
        if preset is not None:
            if preset not in DECODER_PRESETS:
                raise ValueError(
                    f"model.decoder: unknown decoder preset {preset!r}; known: "
                    f"{', '.join(sorted(DECODER_PRESETS))}"
                )
            if self.tokenizer is None:
                raise ValueError("model.tokenizer is required with a preset decoder (a tokenizer folder)")
        elif self.decoder_options:
            raise ValueError(
                "model.decoder_options override a preset decoder's config; this decoder is loaded"
            )

    @property
    def swaps_tower(self) -> bool:
        """A saved VLM with its tower replaced (``init_from`` and ``tower``)."""
        return bool(self.init_from and self.tower)


def template_file(spec: str | None) -> bool:
    """Whether ``model.chat_template`` names a Jinja file (else a built-in, or None)."""
    return bool(spec) and spec.endswith((".jinja", ".j2", ".txt"))


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass
class LoraSection:
    """LoRA adapters on the decoder's linear layers (peft), merged into its weights at export."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self) -> None:
        check_range("finetune.lora.r", self.r, lo=1)
        check_range("finetune.lora.alpha", self.alpha, lo=0, lo_open=True)
        check_range("finetune.lora.dropout", self.dropout, lo=0, hi=1)
        if not isinstance(self.target_modules, list) or not self.target_modules:
            raise ValueError("finetune.lora.target_modules must be a non-empty list of module names")
        if not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"finetune.lora.target_modules must be names, got {self.target_modules!r}")


@dataclass
class FinetuneSection:
    """Stage ``finetune``: the connector and the decoder train, the decoder in full or through LoRA;
    the tower too when ``tower`` is true, at ``tower_lr`` (default ``optim.lr``)."""

    decoder: str = "full"
    lora: LoraSection = field(default_factory=LoraSection)
    tower: bool = False
    tower_lr: float | None = None

    def __post_init__(self) -> None:
        if self.decoder not in DECODER_TRAINING:
            raise ValueError(f"finetune.decoder must be one of {DECODER_TRAINING}, got {self.decoder!r}")
        check_range("finetune.tower_lr", self.tower_lr, lo=0, lo_open=True)
        if self.tower_lr is not None and not self.tower:
            raise ValueError("finetune.tower_lr is the tower's learning rate: set finetune.tower: true too")


@dataclass
class VLMDataSection:
    """Training and held-out shards of image + caption (``txt``) or image + ``json`` {prompt, answer} or a
    conversation (LLaVA's or the messages format, rendered by ``model.chat_template``); or, instead of
    ``train_shards``, ``train_json`` (a JSON Lines file or a JSON array of such records) with the images
    under ``image_folder``; or ``sources``, a list of such sources (``train_shards``, or ``train_json`` with
    ``image_folder``) each with a ``weight`` (default 1), drawn sample by sample in proportion to their
    weights (:mod:`training.data.mixture`). More than ``max_bad_samples`` conversations whose template
    rendering fails its check (``template_mismatch``) stop the run.
    ``batch_size`` is per rank and micro-step; rows are padded per batch, cut at ``max_length`` tokens
    (image tokens included) on the answer side. ``caption_prompt`` is the prompt of captions; ``{field}``
    in it is the sample's ``json`` field (``"{class}"``: the demo's stage text writes captions from the class
    name's words).
    ``max_image_tokens`` (None: no limit): a sample whose images take more decoder tokens (tiled layouts
    give large images more) is skipped and counted (``too_many_image_tokens``); an image is never cut.
    ``feature_cache``: a folder of tower features of ``train_shards`` (``vision-tower extract
    --shards``, of the crops of the model's image layout: ``--image-layout``), read instead of the images
    while the tower is frozen. Held-out data: ``val_shards``, or ``val_json`` (a JSON Lines file or JSON
    array, records read in file order) with its images under ``val_image_folder``. Evaluation generates up
    to ``eval_max_new_tokens`` for at most ``eval_samples`` held-out samples (the first usable ones).
    ``packing``: each of the ``batch_size`` rows holds as many samples as fit in ``max_length`` tokens (at
    most ``max_images_per_row`` images, None: no limit; a sample with more takes a row of its own), each
    sample attending only to itself; the loss is the same as unpacked, with less padding."""

    train_shards: str = ""
    train_json: str | None = None
    image_folder: str | None = None
    sources: list[dict[str, Any]] | None = None
    max_bad_samples: int = 10
    val_shards: str | None = None
    val_json: str | None = None
    val_image_folder: str | None = None
    batch_size: int = 8
    num_workers: int = 2
    shuffle_buffer: int = 1000
    max_length: int = 512
    max_image_tokens: int | None = None
    caption_prompt: str = ""
    feature_cache: str | None = None
    eval_samples: int = 256
    eval_batch_size: int = 16
    eval_max_new_tokens: int = 32
    packing: bool = False
    max_images_per_row: int | None = None

    def __post_init__(self) -> None:
        if self.sources is not None:
            from ..data.mixture import check_source_spec

            if not isinstance(self.sources, list) or not self.sources:
                raise ValueError("data.sources must be a non-empty list of sources")
            if self.train_shards or self.train_json or self.image_folder:
                raise ValueError(
                    "data.sources lists the training data: drop data.train_shards, data.train_json and "
                    "data.image_folder (or put them in a source)"
                )
            if self.feature_cache:
                raise ValueError(
                    "data.feature_cache holds features of data.train_shards: drop it with data.sources"
                )
            self.sources = [check_source_spec(k, spec) for k, spec in enumerate(self.sources)]
        elif bool(self.train_shards) == bool(self.train_json):
            raise ValueError(
                "set one of data.train_shards (a brace pattern, folder or list of .tar shards), "
                "data.train_json (a JSON or JSON Lines file, with data.image_folder) and data.sources "
                "(several, with weights)"
            )
        if self.image_folder and not self.train_json:
            raise ValueError(
                "data.image_folder holds the images of data.train_json: set it, or drop the folder"
            )
        if self.val_shards and self.val_json:
            raise ValueError(
                "set one of data.val_shards and data.val_json (held-out data: shards, or a JSON file with "
                "data.val_image_folder)"
            )
        if self.val_image_folder and not self.val_json:
            raise ValueError(
                "data.val_image_folder holds the images of data.val_json: set it, or drop the folder"
            )
        if self.train_json and self.feature_cache:
            raise ValueError(
                "data.feature_cache holds features of data.train_shards: drop it with data.train_json"
            )
        from ..data.vlm import prompt_fields

        prompt_fields(self.caption_prompt)  # a field that is not a plain name fails here
        check_range("data.max_bad_samples", self.max_bad_samples, lo=0)
        for name in ("batch_size", "max_length", "eval_samples", "eval_batch_size", "eval_max_new_tokens"):
            check_range(f"data.{name}", getattr(self, name), lo=1)
        check_range("data.max_image_tokens", self.max_image_tokens, lo=1)
        check_range("data.num_workers", self.num_workers, lo=0)
        check_range("data.shuffle_buffer", self.shuffle_buffer, lo=0)
        check_range("data.max_images_per_row", self.max_images_per_row, lo=1)
        if self.max_images_per_row is not None and not self.packing:
            raise ValueError(
                "data.max_images_per_row caps the images of a packed row: set data.packing: true, or drop it"
            )


@dataclass
class ExportSection:
    """Formats written to ``run.out_dir/export/<format>`` at the end. None: ``native`` and every format
    that can hold the model (``paligemma``, ``llava``); a format listed that cannot is an error at start."""

    formats: list[str] | None = None

    def __post_init__(self) -> None:
        if self.formats is None:
            return
        if not isinstance(self.formats, list) or not self.formats:
            raise ValueError(f"export.formats must be a non-empty list, got {self.formats!r}")
        unknown = [f for f in self.formats if f not in EXPORT_FORMATS]
        if unknown:
            raise ValueError(f"export.formats: unknown {unknown}; known: {list(EXPORT_FORMATS)}")


@dataclass
class VLMConfig:
    """The ``vision-tower train-vlm`` config. ``stage: text`` trains the decoder alone as a language model
    on the samples' text (their images unread; tower and connector frozen); ``stage: align`` trains the
    connector alone (tower and decoder frozen); ``stage: finetune`` trains connector and decoder
    (``finetune`` section)."""

    stage: str = "align"
    model: VLMModelSection = field(default_factory=VLMModelSection)
    data: VLMDataSection = field(default_factory=VLMDataSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    export: ExportSection = field(default_factory=ExportSection)

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.stage != "finetune" and self.finetune != FinetuneSection():
            alone = {"align": "the connector", "text": "the decoder"}[self.stage]
            raise ValueError(
                f"the finetune section applies to stage finetune; stage {self.stage} trains {alone} alone"
            )
        if self.stage == "text" and self.data.feature_cache:
            raise ValueError("stage text reads no image: drop data.feature_cache")
        if self.data.feature_cache and self.tower_trains:
            raise ValueError(
                "data.feature_cache holds features of a frozen tower; finetune.tower: true trains it: drop "
                "one"
            )

    @property
    def tower_trains(self) -> bool:
        return self.stage == "finetune" and self.finetune.tower

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_vlm_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> VLMConfig:
    """Read a YAML run config (``configs/vlm/...`` also from the repository root or the installed package),
    apply overrides, validate every key and value."""
    return load_sections(VLMConfig, None if path is None else resolve_path(str(path)), overrides)
