"""Conversations with no image, or several, mixed in one batch (LLaVA-Instruct's mix holds about 40k text-only
samples): a text-only conversation is a row without placeholders and without crops, and a rank whose batches
hold no image still runs the tower and connector, so that ZeRO-2/3 ranks reduce and gather the same
parameters. On 2 ranks, one holding only text, a step's loss equals one process's on the whole batch."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.distributed import run_ranks
from tests.helpers.vlm_data import QA_PROMPT, make_conversation_assets, png
from tests.helpers.vlm_workers import built_batches_worker
from training.data.chat import V1
from training.data.shards import SkipSample
from training.demo.shapes import make_sample


def _conversation(key: str, turns: list[str], images: list[bytes]) -> dict:
    """A raw shard sample: LLaVA's record in a ``json`` member, its images as ``0.png``, ``1.png``..."""
    roles = ("human", "gpt")
    record = {
        "id": key,
        "image": [f"{key}-{i}.png" for i in range(len(images))],
        "conversations": [{"from": roles[i % 2], "value": text} for i, text in enumerate(turns)],
    }
    return {"__key__": key, "json": json.dumps(record).encode()} | {
        f"{i}.png": blob for i, blob in enumerate(images)
    }


def _image(i: int) -> bytes:
    return png(make_sample("train", i, image_size=32).image)


def samples() -> dict[str, dict]:
    """One image, two images, and two text-only conversations (one of two turns)."""
    return {
        "one": _conversation("one", [f"<image>\n{QA_PROMPT}", "red"], [_image(0)]),
        "two": _conversation(
            "two",
            [f"<image>\n<image>\n{QA_PROMPT}", "blue", "and its shape", "a circle"],
            [
                _image(1),
                _image(2),
            ],
        ),
        "text": _conversation("text", [QA_PROMPT, "green"], []),
        "text2": _conversation("text2", ["and its shape", "a small square", QA_PROMPT, "red"], []),
    }


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_conversation_assets(tmp_path_factory.mktemp("text_only"), n_train=2, n_val=1)


def _overrides(assets: dict, out, deepspeed: str) -> list[str]:
    return [
        f"model.tower={assets['tower']}",
        f"model.decoder={assets['decoder']}",
        "model.tokenizer=null",
        f"data.train_json={assets['train']}",
        f"data.image_folder={assets['images']}",
        f"run.out_dir={out}",
        f"run.deepspeed=configs/deepspeed/{deepspeed}.json",
        "model.gradient_checkpointing=false",
        "stage=finetune",
        "finetune.tower=true",  # every tower parameter gets a gradient of zero on the text-only rank
        "optim.lr=0.01",
    ]


def test_a_text_only_conversation_is_a_row_without_crops_and_batches_with_images(assets):
    from connectors import VisionLanguageModel
    from training.data.vlm import builder_for

    vlm = VisionLanguageModel(assets["tower"], "linear", assets["decoder"], attention="causal")
    builder = builder_for(vlm, max_length=96, chat_template="v1")
    raw = samples()
    text = builder.build(raw["text2"])
    messages = [
        {"role": "user", "content": "and its shape"},
        {"role": "assistant", "content": "a small square"},
        {"role": "user", "content": QA_PROMPT},
        {"role": "assistant", "content": "red"},
    ]
    expected = vlm.tokenizer.apply_chat_template(messages, chat_template=V1, tokenize=True, return_dict=True)
    assert text.input_ids == expected["input_ids"]
    assert text.images.shape == (0, 3, 32, 32) and text.image_sizes == []
    assert vlm.image_token_id not in text.input_ids

    batch = builder.collate([builder.build(raw[k]) for k in ("one", "text", "two", "text2")])
    per_image = vlm.num_image_tokens
    assert batch["pixel_values"].shape == (3, 3, 32, 32)  # one image, none, two, none
    assert batch["image_sizes"].shape == (3, 2)
    placeholders = (batch["input_ids"] == vlm.image_token_id).sum(-1).tolist()
    assert placeholders == [per_image, 0, 2 * per_image, 0]
    # the replies of the text rows carry the loss
    for row, reply in ((1, "green"), (3, "red")):
        labels = batch["labels"][row]
        kept = vlm.tokenizer.decode(labels[labels >= 0].tolist())
        assert reply in kept, (row, kept)
    # evaluation asks a text-only conversation its first question without an image; a batch of text only
    # has no crop at all
    from training.eval.vlm import evaluate_vlm

    items = [builder.build(raw[k]) for k in ("text", "text2", "one")]
    alone = evaluate_vlm(vlm, items[:2], builder, batch_size=2, max_new_tokens=2)
    mixed = evaluate_vlm(vlm, items, builder, batch_size=3, max_new_tokens=2)
    assert alone.samples == 2 and mixed.samples == 3
    assert mixed.predictions[:2] == alone.predictions

    # a placeholder without its image is a bad sample, not a text-only one
    bad = _conversation("bad", [f"<image>\n{QA_PROMPT}", "red"], [])
    with pytest.raises(SkipSample) as err:
        builder.build(bad)
    assert err.value.reason == "bad_conversation"


@pytest.mark.distributed
def test_a_rank_holding_only_text_trains_under_zero2_and_zero3_with_the_whole_batch_loss(assets, tmp_path):
    raw = samples()
    images, text = [raw["one"], raw["two"]], [raw["text"], raw["text2"]]
    whole = images + text
    config = "tiny_conversations.yaml"
    # one process on the whole batch, two steps (the second after the first's update)
    (reference,) = run_ranks(
        built_batches_worker,
        1,
        config,
        [(_overrides(assets, tmp_path / "ref", "zero0"), [[whole, whole]])],
        timeout=240,
        backend=None,
    )[0]
    # rank 0 holds the images, rank 1 text only: its tower and connector see no crop
    shares = [[images, images], [text, text]]
    ranks = run_ranks(
        built_batches_worker,
        2,
        config,
        [(_overrides(assets, tmp_path / f"z{s}", f"zero{s}"), shares) for s in (2, 3)],
        timeout=300,
        backend=None,
    )
    assert reference[0] != pytest.approx(reference[1], rel=1e-3)  # the step moved the weights
    for rank, (zero2, zero3) in enumerate(ranks):
        assert zero2 == pytest.approx(reference, rel=1e-5), (rank, zero2, reference)
        assert zero3 == pytest.approx(reference, rel=1e-5), (rank, zero3, reference)


@pytest.mark.parametrize("layout", ["fixed", "anyres"])
def test_a_batch_without_images_is_the_decoders_loss_and_reaches_every_trained_parameter(assets, layout):
    """A batch of text only: the decoder's own loss on the ids, and every parameter of tower, connector and
    image layout (anyres: ``image_newline``) gets a gradient (of zero), as ZeRO-2/3 reduce them on every
    rank."""
    from connectors import VisionLanguageModel

    torch.manual_seed(0)
    vlm = VisionLanguageModel(
        assets["tower"], "linear", assets["decoder"], attention="causal", image_layout=layout
    )
    ids = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 9, 8, 7, 0, 0]])
    mask = (ids != 0).long()
    labels = ids.masked_fill(mask == 0, -100)
    pixels = torch.zeros((0, 3, 32, 32))
    out = vlm(ids, pixels, mask, labels=labels, image_sizes=torch.zeros((0, 2), dtype=torch.long))
    expected = vlm.decoder(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    for name, param in vlm.named_parameters():
        if not name.startswith("decoder."):
            assert param.grad is not None and not param.grad.any(), name
    assert layout == "fixed" or vlm.layout_params["image_newline"].grad is not None


def test_stage_text_rows_are_the_samples_text_without_images(assets):
    """Stage ``text``: a caption's row is its prompt (``{field}`` names filled from the ``json``) and
    caption as without the image (no image read: a sample whose image is broken still gives its text), a
    conversation's ``<image>`` is dropped; only the decoder trains."""
    from connectors import VisionLanguageModel
    from connectors.inputs import text_ids
    from training.data.vlm import builder_for
    from training.tasks.vlm_config import load_vlm_config
    from training.tasks.vlm_model import set_stage

    vlm = VisionLanguageModel(assets["tower"], "linear", assets["decoder"], attention="prefix")
    tok = vlm.tokenizer
    builder = builder_for(vlm, max_length=96, caption_prompt="{color}", chat_template="v1", text_only=True)
    meta = {"color": "red", "shape": "circle"}
    caption = {
        "__key__": "c",
        "jpg": b"not an image",
        "txt": b"a red circle",
        "json": json.dumps(meta).encode(),
    }
    row = builder.build(caption)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    expected = [bos, *tok("red\n", add_special_tokens=False)["input_ids"]]
    assert row.input_ids == expected + text_ids(tok, "a red circle") + [eos]
    assert row.num_prefix == len(expected) and row.images.shape[0] == 0
    with pytest.raises(SkipSample) as err:  # the field the prompt names is missing
        builder.build({**caption, "json": b'{"shape": "circle"}'})
    assert err.value.reason == "bad_caption" and "'color'" in str(err.value)

    conv = builder.build(samples()["one"])
    plain = builder_for(vlm, max_length=96, chat_template="v1").build(
        samples()["text"]
    )  # same words, no image
    assert vlm.image_token_id not in conv.input_ids and conv.images.shape[0] == 0
    assert conv.input_ids[: conv.num_prefix] == plain.input_ids[: plain.num_prefix]

    cfg = load_vlm_config(None, ["stage=text", *cfg_keys(assets)])
    set_stage(vlm, cfg)
    trained = {n.split(".")[0] for n, p in vlm.named_parameters() if p.requires_grad}
    assert trained == {"decoder"}
    for bad in ("{a.b}", "{0}", "{x!r}", "{"):
        with pytest.raises(ValueError, match="data.caption_prompt"):
            load_vlm_config(None, [*cfg_keys(assets), f"data.caption_prompt={bad}"])


def cfg_keys(assets: dict) -> list[str]:
    return [f"model.tower={assets['tower']}", f"model.decoder={assets['decoder']}", "data.train_shards=x"]
