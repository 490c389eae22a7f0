"""train-vlm with Idefics3's ``split`` and Gemma 3's ``pan_and_scan`` image layouts on 2 ranks: stage align,
then stage finetune from its export, on a shard of wide, tall and large images (24x60, 64x40, 90x90) that
each layout cuts into its own crops and writes with its own prompt text (tile markers, image blocks). Split:
SmolLM-style Llama decoder, ``pixel_shuffle``, ZeRO-2. Pan and scan: Gemma 3 decoder, ``avg_pool`` and Gemma
3's image attention, ZeRO-3. Each run's finetune also exports its transformers format (``idefics3``,
``gemma3``), which transformers' ``AutoProcessor`` and ``Idefics3ForConditionalGeneration`` /
``Gemma3ForConditionalGeneration`` load from the folder and caption with: the same ids, logits and greedy
tokens as ours on that export."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

from connectors import VisionLanguageModel, build_connector
from connectors.layouts import CropShape, build_layout
from tests.helpers.distributed import run_ranks, small_run
from tests.helpers.shards import write_tar
from tests.helpers.vlm_data import QA_PROMPT, sized_qa_members, texts
from tests.helpers.vlm_reference import assert_same_logits_and_greedy_tokens, our_prompt_batch
from tests.helpers.vlm_workers import stages_worker
from training.demo.decoders import word_tokenizer
from vision_tower import VisionTower

BOI, EOI = "<start_of_image>", "<end_of_image>"  # Gemma 3's image block
CASES = {
    "split": {
        "connector": ("pixel_shuffle", {"factor": 2}),
        "decoder": "preset:tiny_llama",
        "attention": "causal",
        "options": {"longest_edge": 64},  # 2x2 tiles of 32 px at most, then the global image
        "deepspeed": "configs/deepspeed/zero2.json",
        "export": "idefics3",  # the finetune's export that transformers captions with
    },
    "pan_and_scan": {
        "connector": ("avg_pool", {"tokens_per_side": 2}),
        "decoder": "preset:tiny_gemma3",
        "attention": "image_bidirectional",
        "options": {"min_crop_size": 16},  # 24x60 and 64x40 are panned (2 crops each), 90x90 is not
        "deepspeed": "configs/deepspeed/zero3.json",
        "export": "gemma3",  # the finetune's export that transformers captions with
    },
}


def _overrides(case: dict, root: Path, out: Path, lr: float, **extra) -> list[str]:
    base = {
        **small_run(out),
        "data.train_shards": root / "sized",
        "data.val_shards": root / "sized",
        "data.num_workers": 0,
        "data.max_length": 100,
        "data.eval_samples": 8,
        "data.eval_max_new_tokens": 3,
        "run.steps": 6,
        "run.save_every": 0,
        "run.deepspeed": case["deepspeed"],
        "run.precision": "fp32",
        "optim.lr": lr,
        "optim.warmup_steps": 0,
        "optim.min_lr_ratio": 1.0,
        "export.formats": "[native]",
        **extra,
    }
    return [f"{k}={v}" for k, v in base.items()]


@pytest.mark.parametrize("layout", list(CASES))
def test_two_ranks_align_then_finetune_in_the_layout(layout, tmp_path):
    case = CASES[layout]
    name, options = case["connector"]
    shape = CropShape.of(build_connector(name, 64, 64, **options), (32, 32), (4, 4))
    tokens = build_layout(layout, shape, **case["options"]).text_tokens()
    tokenizer = word_tokenizer(texts(), extra_tokens=("<image>", *tokens))
    if layout == "pan_and_scan":  # the names Gemma3Processor reads its image block's tokens by
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer.backend_tokenizer,
            **{k: getattr(tokenizer, k) for k in ("pad_token", "bos_token", "eos_token", "unk_token")},
            extra_special_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": "<image>"},
        )
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    torch.manual_seed(8)
    VisionTower.from_preset("tiny", use_head=False).save_pretrained(tmp_path / "tower")
    write_tar(tmp_path / "sized" / "sized-000.tar", sized_qa_members(48))
    a, f = tmp_path / "align", tmp_path / "finetune"
    model = {
        "model.tower": tmp_path / "tower",
        "model.connector": name,
        "model.connector_options": json.dumps(options),
        "model.decoder": case["decoder"],
        "model.tokenizer": tmp_path / "tokenizer",
        "model.attention": case["attention"],
        "model.image_layout": layout,
        "model.layout_options": json.dumps(case["options"]),
    }
    align = _overrides(case, tmp_path, a, 3e-2, **model)
    formats = f"[native,{case['export']}]" if case["export"] else "[native]"
    finetune = _overrides(
        case, tmp_path, f, 3e-3, **{"model.init_from": a / "export" / "native", "export.formats": formats}
    )
    r = run_ranks(stages_worker, 2, align, finetune, timeout=400, backend=None)[0]
    for stage in ("align", "finetune"):
        values = r[stage]["losses"]
        assert sum(values[-2:]) < sum(values[:2]), (stage, values)
    assert r["align"]["held"] and all(k.startswith("connector.") for k in r["align"]["held"])
    assert any(k.startswith("decoder.") for k in r["finetune"]["held"])
    assert r["align"]["partitioned"] == r["finetune"]["partitioned"] == ("zero3" in case["deepspeed"])
    for run in (a, f):
        config = json.loads((run / "export" / "native" / "config.json").read_text())
        saved = config["image_layout"]
        assert saved["name"] == layout and case["options"].items() <= saved["options"].items(), saved
        assert config["attention"] == case["attention"]
    aligned = load_file(a / "export" / "native" / "connector.safetensors")
    finetuned = load_file(f / "export" / "native" / "connector.safetensors")
    assert all(not torch.equal(aligned[k], finetuned[k]) for k in aligned)  # the finetune trained it on
    if case["export"] == "idefics3":
        _captions_in_transformers(f / "export" / case["export"])
    elif case["export"] == "gemma3":
        _gemma3_captions_in_transformers(f / "export" / case["export"], case["options"])


def _captions_in_transformers(folder: Path) -> None:
    """transformers' AutoProcessor and Idefics3ForConditionalGeneration, from the exported folder alone, build
    the inputs of a wide and a large image of the shard (tiles and the global image) with a prompt: its ids
    and crops are ours, its logits ours, and it generates greedily what our VisionLanguageModel generates
    from the same export."""
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "Idefics3Processor"
    processor.tokenizer.padding_side = "left"  # as ours lays a batch out
    hf = transformers.Idefics3ForConditionalGeneration.from_pretrained(folder).eval()
    ours = VisionLanguageModel.from_pretrained(folder).eval()
    members = sized_qa_members(3)  # png, json of each sample
    # 24x60: 1x2 tiles; 90x90: 2x2 tiles (each then the global image)
    images = [Image.open(io.BytesIO(members[i][1])).convert("RGB") for i in (0, 4)]
    prompts = [f"<image> {QA_PROMPT}"] * len(images)
    batch = processor(images=[[i] for i in images], text=prompts, return_tensors="pt", padding=True)

    pixels, sizes = ours.image_inputs(images)
    counts = [ours.layout.num_crops(s) for s in sizes.tolist()]
    assert counts == [3, 5], counts
    assert torch.equal(batch["pixel_values"][0, :3], pixels[:3]) and not batch["pixel_values"][0, 3:].any()
    assert torch.equal(batch["pixel_values"][1], pixels[3:])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    built = our_prompt_batch(ours, prompts, sizes)
    assert torch.equal(ids, built.input_ids) and torch.equal(mask, built.attention_mask)
    assert_same_logits_and_greedy_tokens(hf, ours, dict(batch), pixels, sizes)


def _gemma3_captions_in_transformers(folder: Path, pan: dict) -> None:
    """transformers' AutoProcessor (Gemma3Processor, pan and scan as the layout's) and
    Gemma3ForConditionalGeneration, from the exported folder alone, build a wide (panned) and a large image
    of the shard with a prompt: its ids are ours, and on its inputs its logits and greedy tokens are ours."""
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == "Gemma3Processor"
    processor.tokenizer.padding_side = "left"  # as ours lays a batch out
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(folder).eval()
    ours = VisionLanguageModel.from_pretrained(folder).eval()
    members = sized_qa_members(3)
    images = [Image.open(io.BytesIO(members[i][1])).convert("RGB") for i in (0, 4)]  # 24x60, 90x90
    options = {"do_pan_and_scan": True, **{f"pan_and_scan_{k}": v for k, v in pan.items()}}
    prompts = [f"{BOI} {QA_PROMPT}"] * len(images)
    batch = processor(
        images=[[i] for i in images], text=prompts, return_tensors="pt", padding=True, **options
    )
    sizes = torch.tensor([[i.height, i.width] for i in images])
    assert [ours.layout.num_crops(s) for s in sizes.tolist()] == [4, 1]  # the image and 3 crops; not panned
    ids, mask = batch["input_ids"], batch["attention_mask"]
    built = our_prompt_batch(
        ours, [f"<image> {QA_PROMPT}"] * len(images), sizes, pad_token_id=ours.tokenizer.pad_token_id
    )
    assert torch.equal(ids, built.input_ids) and torch.equal(mask, built.attention_mask)
    inputs = {k: v for k, v in batch.items() if k != "num_crops"}
    # every image, then its crops: what ours reads too
    assert_same_logits_and_greedy_tokens(hf, ours, inputs, batch["pixel_values"], sizes)
