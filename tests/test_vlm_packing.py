"""Packing (``data.packing``): several samples per row, each attending only to itself. A packed batch's loss
and gradients equal those of the same samples one per row, under each attention (PaliGemma's prefix,
causal, Gemma 3's image blocks with sliding-window layers); changing one sample of a row leaves the others'
logits alone; the stream packs rows within the limits and resumes exactly; the config keys are checked;
``train-vlm`` trains with packing."""

from __future__ import annotations

import json

import pytest
import torch
from torch.testing import assert_close

from connectors import VisionLanguageModel, inputs
from tests.helpers import vlm_reference as R
from tests.helpers.vlm_data import (
    conversation_model_keys,
    make_conversation_assets,
    train_and_check_the_loss_falls,
)
from training.data.packing import RowPacker, collate_packed
from training.data.shards import SkipSample
from training.data.stream import ShardDataset, ShardLoader
from training.data.vlm import PixelImages, VLMBuilder, VLMItem
from training.runner.paths import ROOT
from training.tasks.vlm import model_inputs
from training.tasks.vlm_config import VLMDataSection, load_vlm_config

CONVERSATIONS = ROOT / "configs" / "vlm" / "tiny_conversations.yaml"


def _vlm(family: str, attention: str) -> VisionLanguageModel:
    vlm = VisionLanguageModel(
        R.tower(), "mlp2x_gelu", R.decoder(family), attention=attention, tokenizer=R.tokenizer()
    )
    R.randomize_(vlm.connector, seed=3, scale=0.3)
    return vlm.eval()


def _builder(vlm: VisionLanguageModel) -> VLMBuilder:
    images = PixelImages(vlm.image_processor(), vlm.layout, vlm.tower.config.patch_size)
    return VLMBuilder(
        vlm.tokenizer,
        image_token_id=vlm.image_token_id,
        layout=vlm.layout,
        images=images,
        max_length=256,
        causal=vlm.attention != "prefix",
    )


def _items(vlm: VisionLanguageModel, seed: int = 0) -> list[VLMItem]:
    """Samples of different lengths: one or two images (bos, text between them) or none, a prompt, an answer
    and eos; the third a conversation whose targets are two replies apart."""
    g = torch.Generator().manual_seed(seed)
    n, img = vlm.num_image_tokens, vlm.image_token_id

    def words(k: int) -> list[int]:
        return torch.randint(5, 200, (k,), generator=g).tolist()

    shapes = [
        (1, 2, 3),
        (2, 4, 9),
        (1, 1, 2),
        (1, 3, 5),
        (2, 6, 11),
        (1, 2, 4),
        (0, 3, 4),
    ]  # images, prompt, answer
    items = []
    for k, (m, p, a) in enumerate(shapes):
        prefix = [1] + [t for _ in range(m) for t in [img] * n + words(1)] + words(p)
        ids = prefix + words(a) + [2]
        targets = None
        num_prefix = len(prefix)
        if k == 2:  # a conversation: reply, a user turn, reply (the user turn is no target)
            ids = prefix + words(3) + words(2) + words(3) + [2]
            targets = [False] * len(prefix) + [True] * 3 + [False] * 2 + [True] * 4
        if k == 5:  # a template marking the first token: in a row of its own nothing predicts it
            targets, num_prefix = [True] + [False] * (len(prefix) - 1) + [True] * (len(ids) - len(prefix)), 0
        pixels = torch.randn(m, 3, 32, 32, generator=g)
        items.append(
            VLMItem(f"s{k}", pixels, vlm.grid, [(32, 32)] * m, ids, num_prefix, "", "", targets=targets)
        )
    return items


def _loss_and_grads(vlm: VisionLanguageModel, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training step's loss (the task's inputs, the targets-only head, over the batch's target count)
    and every parameter's gradient."""
    vlm.zero_grad()
    count = vlm.count_targets(
        batch["input_ids"], batch["labels"], batch["token_type_ids"], batch["attention_mask"]
    )
    loss = vlm(**model_inputs(batch), num_items_in_batch=count, targets_only=True).loss
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in vlm.named_parameters() if p.grad is not None}


CASES = [
    ("gemma", "prefix", True),
    ("gemma", "prefix", False),  # an older transformers: the same masks from explicit overlays
    ("llama", "causal", True),
    ("gemma3_text", "image_bidirectional", True),  # a window of 8 that the samples exceed
    ("gemma3_text", "image_bidirectional", False),
]


@pytest.mark.parametrize(("family", "attention", "block_ids"), CASES)
def test_packed_loss_and_gradients_equal_the_unpacked_batch(family, attention, block_ids, monkeypatch):
    monkeypatch.setattr(inputs, "BLOCK_IDS", block_ids)
    vlm = _vlm(family, attention)
    builder, items = _builder(vlm), _items(vlm)
    rows = [[items[0], items[5], items[2]], items[3:5], [items[6], items[1]]]  # lengths differ; text only
    packed = collate_packed(builder, rows)
    assert packed["input_ids"].shape[0] == 3 and packed["attention_mask"].sum(1).unique().numel() == 3
    loss, grads = _loss_and_grads(vlm, builder.collate(items))
    packed_loss, packed_grads = _loss_and_grads(vlm, packed)
    assert 3 < loss < 8  # a random model's next-token loss over 256 words
    assert_close(packed_loss, loss, rtol=0, atol=1e-5)
    assert grads.keys() == packed_grads.keys() and any(k.startswith("decoder.") for k in grads)
    for name in grads:
        assert_close(packed_grads[name], grads[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("family", "attention"), [("gemma", "prefix"), ("gemma3_text", "image_bidirectional")]
)
def test_a_sample_sees_only_itself_in_a_packed_row(family, attention):
    vlm = _vlm(family, attention)
    builder, items = _builder(vlm), _items(vlm)
    first, second = items[1], items[4]  # two images each: blocks of their own in the row
    other = _items(vlm, seed=1)[4]  # the same layout, other words and pixels
    n1 = len(first.input_ids)

    def logits(row: list[VLMItem]) -> torch.Tensor:
        batch = collate_packed(builder, [row])
        with torch.no_grad():
            return vlm(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits[0]

    together = logits([first, second])
    assert_close(logits([first, other])[:n1], together[:n1], rtol=0, atol=1e-6)  # the later sample is unseen
    assert (logits([first, other])[n1:] - together[n1:]).abs().max() > 1e-2  # ... though it changed
    assert_close(logits([other, second])[len(other.input_ids) :], together[n1:], rtol=0, atol=1e-5)
    assert_close(logits([second])[: len(second.input_ids)], together[n1:], rtol=0, atol=1e-5)  # as alone


# ---------------------------------------------------------------- the stream


class _Builder:
    """Items of the lengths and image counts the raw samples name; ``bad`` keys are skipped."""

    truncation_advice = ""
    pad_id = 0

    def __init__(self, bad=()):
        self.bad = set(bad)

    def build(self, sample):
        if sample["__key__"] in self.bad:
            raise SkipSample("bad_caption", "test")
        n, m = sample["shape"]
        return VLMItem(sample["__key__"], torch.zeros(m, 1), (1, 1), [(1, 1)] * m, [5] * n, 1, "", "")

    def collate(self, items):
        return {"__key__": [it.key for it in items]}


SHAPES = [(9, 1), (3, 1), (7, 2), (2, 0), (10, 1), (4, 3), (5, 1), (6, 1), (1, 1), (8, 2), (3, 1), (2, 1)] * 3


def _reader(url, counter):
    for i, shape in enumerate(SHAPES):
        yield {"__key__": f"k{i:02d}", "__url__": url, "shape": shape}


def _loader(resume_state=None) -> ShardLoader:
    packer = RowPacker(12, max_images=3)  # one process, one pass in order (the defaults)
    dataset = ShardDataset(["a"], _Builder(bad={"k05", "k17"}), batch_size=2, reader=_reader, packer=packer)
    return ShardLoader(dataset, num_workers=0, resume_state=resume_state)


def test_the_stream_packs_rows_within_the_limits_and_resumes_exactly():
    full = [(b["__key__"], b["samples_per_row"], b["input_ids"], b["position_ids"]) for b in _loader()]
    keys = [k for batch in full for k in batch[0]]
    assert sorted(keys) == [f"k{i:02d}" for i in range(len(SHAPES)) if i not in (5, 17)]  # each once
    assert sum(len(batch[1]) for batch in full) < len(keys) * 2 / 3  # most rows hold several samples
    for _, per_row, ids, pos in full[:-1]:
        assert len(per_row) == 2  # batch_size rows
        assert (ids != 0).sum(1).max() <= 12  # max_length
        starts = (pos == 0) & (ids != 0)
        assert starts.sum(1).tolist() == per_row  # positions restart at each sample
    images = {f"k{i:02d}": m for i, (_, m) in enumerate(SHAPES)}
    for names, per_row, *_ in full:
        ends = torch.tensor(per_row).cumsum(0).tolist()
        for count, end in zip(per_row, ends, strict=True):
            assert count == 1 or sum(images[k] for k in names[end - count : end]) <= 3  # max_images
    loader = _loader()
    head = [b["__key__"] for _, b in zip(range(4), loader, strict=False)]
    state = json.loads(json.dumps(loader.state_dict()))
    rest = [b["__key__"] for b in _loader(resume_state=state)]
    assert head + rest == [batch[0] for batch in full]
    with pytest.raises(ValueError, match="packing"):  # a saved position means other batches unpacked
        dataset = _loader().dataset
        dataset.packer = None
        ShardLoader(dataset, num_workers=0, resume_state=state)


# ---------------------------------------------------------------- the config and a run


def test_packing_keys_are_checked():
    data = VLMDataSection(train_shards="x", packing=True, max_images_per_row=2)
    assert (data.packing, data.max_images_per_row) == (True, 2)
    assert VLMDataSection(train_shards="x").packing is False
    with pytest.raises(ValueError, match="data.max_images_per_row caps the images of a packed row"):
        VLMDataSection(train_shards="x", max_images_per_row=2)
    with pytest.raises(ValueError, match="data.max_images_per_row"):
        VLMDataSection(train_shards="x", packing=True, max_images_per_row=0)
    with pytest.raises(ValueError, match="data.packing"):
        load_vlm_config(CONVERSATIONS, ["data.packing=2"])


@pytest.mark.distributed
def test_train_vlm_with_packing_lowers_the_loss(tmp_path):
    assets = make_conversation_assets(tmp_path / "data", n_train=32, n_val=2)
    out = tmp_path / "run"
    values = {
        **conversation_model_keys(assets),
        "data.packing": "true",
        "data.max_images_per_row": 3,
        "data.max_length": 240,
        "data.batch_size": 2,
        "data.num_workers": 0,
    }
    records = train_and_check_the_loss_falls(CONVERSATIONS, values, out)
    assert "rows_per_s" in records[1] and records[-1]["skipped"] == 0, records[:2]


def test_packed_rows_under_flash_attention_need_a_batch_of_one_row():
    vlm = _vlm("llama", "causal")
    builder, items = _builder(vlm), _items(vlm)
    batch = model_inputs(collate_packed(builder, [items[:2], items[2:4]]))
    vlm.decoder.config._attn_implementation = "flash_attention_2"  # the check comes before any kernel
    with pytest.raises(
        ValueError, match="flash attention: .* batch of one row, this one has 2; set data.batch_size: 1"
    ):
        vlm(**batch)
