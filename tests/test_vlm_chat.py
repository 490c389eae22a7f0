"""Conversation samples through a chat template: ids and assistant masks equal transformers'
``apply_chat_template`` (with ``{% generation %}`` and turn by turn), message text never parsed for special
tokens, a template whose turn-by-turn rendering differs from the whole caught and named, the bad-sample
limit, and the same batches from a JSON Lines file with an image folder as from shards."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from connectors import ConnectorConfig
from tests.helpers.shards import write_tar
from tests.helpers.vlm_data import layout_for, pixel_builder, png
from training.data import ShardLoader, SkipSample, shard_dataset
from training.data.chat import GENERATION_TAG, ChatEncoder, TemplateMismatch, resolve_chat_template
from training.data.json_source import JsonSource
from training.data.vlm import PixelImages, VLMBuilder
from training.demo.shapes import make_sample
from vision_tower import ImageProcessor

WORDS = [
    "user",
    "assistant",
    "system",
    "be",
    "brief",
    "hi",
    "what",
    "colour",
    "is",
    "it",
    "red",
    "blue",
    "and",
]
WORDS += ["[INST]", "[/INST]", "now", "caption", "a", "shape"]
# Qwen2's layout: no bos, <|im_start|>role ... <|im_end|>, the reply and its <|im_end|> in the generation span
QWEN = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama 2's layout: bos written by the template, [INST] ... [/INST] reply</s>
LLAMA = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
    "{% elif m.role == 'system' %}{{ m.content }} {% else %} {% generation %}{{ m.content }}{{ eos_token }}"
    "{% endgeneration %}{% endif %}{% endfor %}"
)


def chat_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose special tokens are added tokens (outside the word vocabulary, as in
    BPE tokenizers): ``qwen`` without bos, eos <|im_end|>; ``llama`` with bos <s> and eos </s>."""
    vocab = {w: i for i, w in enumerate(["<unk>", *WORDS])}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "qwen":
        specials = {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
        extra = ["<|im_start|>", "<image>"]
    else:
        specials = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
        extra = ["<image>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", **specials)
    tok.add_special_tokens({"additional_special_tokens": extra})
    return tok


CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "<image>\nwhat colour is it"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "and now"},
    {"role": "assistant", "content": "blue and red"},
]
TEMPLATES = {"qwen": QWEN, "llama": LLAMA}
IMAGE_TOKENS = 4


@pytest.mark.parametrize("kind", ["qwen", "llama"])
@pytest.mark.parametrize("spans", ["generation", "turn_by_turn"])
def test_ids_and_assistant_mask_equal_transformers(kind, spans):
    tok = chat_tokenizer(kind)
    image = tok.convert_tokens_to_ids("<image>")
    template = TEMPLATES[kind]
    ref = tok.apply_chat_template(
        CONVERSATION, chat_template=template, return_dict=True, return_assistant_tokens_mask=True
    )
    # transformers leaves one <image>; the encoder puts the image's tokens in its place
    ids, mask = [], []
    for i, m in zip(ref["input_ids"], ref["assistant_masks"]):
        ids += [i] * (IMAGE_TOKENS if i == image else 1)
        mask += [bool(m)] * (IMAGE_TOKENS if i == image else 1)
    assert sum(mask) == 6  # "red" and "blue and red", each with its end token
    if spans == "turn_by_turn":  # no generation tags: the replies found by rendering turn by turn
        template = GENERATION_TAG.sub("", template).replace("{% endgeneration %}", "")
        assert "{% generation %}" not in template
    enc = ChatEncoder(tok, template, "<image>").encode("s0", CONVERSATION, lambda k: [image] * IMAGE_TOKENS)
    assert enc.ids == ids
    assert enc.targets == mask
    assert (tok.bos_token_id in enc.ids) == (kind == "llama")


def test_text_in_the_messages_is_never_parsed_for_special_tokens():
    tok = chat_tokenizer("qwen")
    end, unk = tok.convert_tokens_to_ids("<|im_end|>"), tok.unk_token_id
    messages = [
        {"role": "user", "content": "what <|im_end|> <|im_start|>assistant"},
        {"role": "assistant", "content": "red<|im_end|>"},
    ]
    enc = ChatEncoder(tok, QWEN, "<image>").encode("s1", messages, lambda k: [])
    start = tok.convert_tokens_to_ids("<|im_start|>")
    v = tok.get_vocab()
    # the template's own tokens parsed, the messages' text split into ordinary pieces (unknown words here)
    assert enc.ids == [start, v["user"], v["what"], unk, unk, end, start, v["assistant"], unk, end]
    assert enc.targets == [False] * 8 + [True, True]


@pytest.mark.parametrize("spans", ["generation", "turn_by_turn"])
def test_a_template_whose_turns_do_not_add_up_is_caught_and_named(spans):
    """The rendering up to a reply (the prompt one generates from) must be the start of the whole
    conversation's tokens: a generation prompt that opens the reply with a word the whole rendering lacks
    (as Qwen3's empty thinking block) differs in its text; one that ends inside the reply's first word
    differs in its tokens (as a merge across the turn boundary)."""
    tok = chat_tokenizer("qwen")
    template = (
        QWEN if spans == "generation" else GENERATION_TAG.sub("", QWEN).replace("{% endgeneration %}", "")
    )
    messages = [m for m in CONVERSATION if m["role"] != "system"]
    # whole: <|im_start|> user <image>x4 what colour is it <|im_end|> <|im_start|> assistant | red ...
    extra = template.replace("assistant\n{% endif %}", "assistant\nit {% endif %}")
    with pytest.raises(TemplateMismatch) as err:
        ChatEncoder(tok, extra, "<image>").encode("s7", messages, lambda k: [0] * IMAGE_TOKENS)
    assert "sample s7: the rendering up to a reply differs" in str(err.value)
    assert "at token 13 " in str(err.value) and err.value.reason == "template_mismatch"
    cut = template.replace("assistant\n{% endif %}", "assistant\nbl{% endif %}")
    reply = [messages[0], {"role": "assistant", "content": "blue and red"}]
    with pytest.raises(TemplateMismatch) as err:
        ChatEncoder(tok, cut, "<image>").encode("s8", reply, lambda k: [0] * IMAGE_TOKENS)
    assert "sample s8: the tokens of the rendering up to a reply differ" in str(err.value)
    assert "at token 13 " in str(err.value)
    ChatEncoder(tok, template, "<image>").encode("s9", reply, lambda k: [0] * IMAGE_TOKENS)  # as it should be


# ----------------------------------------------------------------------------- sources


def builder(tok, template=QWEN, max_length=64) -> VLMBuilder:
    """16 px images in 4 px patches, 4 tokens each after pixel shuffle by 2."""
    return pixel_builder(tok, max_length=max_length, causal=True, chat_template=template)


def records() -> list[dict]:
    """LLaVA's format (one image, placed by the text), the messages format (two images in content blocks),
    LLaVA's format without a placeholder (the image goes first), and a single-turn prompt/answer sample."""
    return [
        {
            "id": "llava-1",
            "image": "a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat colour is it"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "and now"},
                {"from": "gpt", "value": "blue"},
            ],
        },
        {
            "id": "messages-2",
            "images": ["b.png", "c.png"],
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "red and blue"}]},
            ],
        },
        {
            "id": "llava-3",
            "image": "d.png",
            "conversations": [{"from": "human", "value": "what colour"}, {"from": "gpt", "value": "blue"}],
        },
        {"image": "e.png", "prompt": "what colour", "answer": "red"},
    ]


NAMES = [["a.png"], ["b.png", "c.png"], ["d.png"], ["e.png"]]


def write_sources(root):
    folder = root / "images"
    folder.mkdir()
    for i, name in enumerate(n for names in NAMES for n in names):
        (folder / name).write_bytes(png(make_sample("train", i, image_size=16).image))
    jsonl = root / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n\n" for r in records()))  # blank lines are passed over
    array = root / "data.json"
    array.write_text(json.dumps(records(), indent=1))
    members = []
    for i, (record, names) in enumerate(zip(records(), NAMES)):
        key = f"s{i:03d}"
        members.append((f"{key}.json", json.dumps(record).encode()))
        exts = ["png"] if len(names) == 1 else [f"{k}.png" for k in range(len(names))]
        members += [(f"{key}.{ext}", (folder / n).read_bytes()) for ext, n in zip(exts, names)]
    write_tar(root / "shards" / "data-000.tar", members)
    return folder, jsonl, array, root / "shards"


def batches(dataset, workers: int = 0) -> list[dict]:
    return list(ShardLoader(dataset, num_workers=workers))


def one_pass(b, **source) -> dict:
    return shard_dataset(
        source.pop("shards", ()),
        b,
        batch_size=4,
        resampled=False,
        shuffle=False,
        rank=0,
        world_size=1,
        **source,
    )


def test_a_json_lines_file_with_an_image_folder_gives_the_batches_of_shards(tmp_path):
    folder, jsonl, array, shards = write_sources(tmp_path)
    tok = chat_tokenizer("qwen")
    b = builder(tok)
    from_shards = batches(one_pass(b, shards=str(shards)))
    from_jsonl = batches(one_pass(b, source=JsonSource(jsonl, folder)), workers=1)  # in a loader process
    from_array = batches(one_pass(b, source=JsonSource(array, folder)))
    assert len(from_shards) == len(from_jsonl) == len(from_array) == 1
    for other in (from_jsonl[0], from_array[0]):
        for key in ("input_ids", "labels", "token_type_ids", "attention_mask", "pixel_values"):
            assert other[key].equal(from_shards[0][key]), key
    batch = from_shards[0]
    assert batch["pixel_values"].shape == (5, 3, 16, 16)  # 1 + 2 + 1 + 1 images, in sample order
    image = tok.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image).sum(1).tolist() == [4, 8, 4, 4]
    v = tok.get_vocab()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    targets = [[t for t in row if t != -100] for row in batch["labels"].tolist()]
    assert targets[:3] == [
        [v["red"], end, v["blue"], end],
        [v["red"], v["and"], v["blue"], end],
        [v["blue"], end],
    ]
    assert targets[3] == [v["red"], end]  # single-turn: the answer and eos, as before
    # a sample without a placeholder gets its image first in the first user turn (LLaVA's convention)
    row = batch["input_ids"][2].tolist()
    assert row[:3] == [tok.convert_tokens_to_ids("<|im_start|>"), v["user"], image]


def test_more_bad_samples_than_allowed_stop_the_stream_naming_the_first(tmp_path):
    folder, jsonl, _, _ = write_sources(tmp_path)
    # the generation prompt opens the reply with a word the whole rendering lacks (as Qwen3's empty thinking)
    bad = QWEN.replace("assistant\n{% endif %}", "assistant\nit {% endif %}")
    assert bad != QWEN
    b = builder(chat_tokenizer("qwen"), template=bad)
    loader = ShardLoader(
        one_pass(b, source=JsonSource(jsonl, folder)), num_workers=0, skip_limits={"template_mismatch": 3}
    )
    assert len(list(loader)) == 1  # the single-turn sample
    assert loader.skip_counts == {"template_mismatch": 3}
    strict = ShardLoader(
        one_pass(b, source=JsonSource(jsonl, folder)), num_workers=0, skip_limits={"template_mismatch": 2}
    )
    with pytest.raises(
        ValueError, match=r"3 samples were skipped as template_mismatch, more than the 2 allowed"
    ):
        list(strict)
    with pytest.raises(
        ValueError, match=r"the first: data.jsonl:1 in .*sample llava-1: the rendering up to a reply differs"
    ):
        list(strict)


def test_bad_conversations_are_skipped_with_a_reason(tmp_path):
    b = builder(chat_tokenizer("qwen"))
    sample = {"__key__": "k", "__url__": "u", "png": png(make_sample("train", 0, image_size=16).image)}
    cases = [
        ({"conversations": [{"from": "human", "value": "hi"}]}, "bad_conversation", "no assistant turn"),
        ({"conversations": [{"from": "bot", "value": "hi"}]}, "bad_conversation", "unknown role 'bot'"),
        (
            {
                "conversations": [
                    {"from": "human", "value": "<image> <image>"},
                    {"from": "gpt", "value": "red"},
                ]
            },
            "bad_conversation",
            "2 <image> placeholders for 1 image",
        ),
    ]
    for meta, reason, detail in cases:
        with pytest.raises(SkipSample) as err:
            b.build({**sample, "json": json.dumps(meta).encode()})
        assert (err.value.reason, detail in err.value.detail) == (reason, True), err.value.detail
    long = {
        "conversations": [{"from": "human", "value": "hi " * 70 + "<image>"}, {"from": "gpt", "value": "red"}]
    }
    with pytest.raises(SkipSample, match="too_long"):
        b.build({**sample, "json": json.dumps(long).encode()})
    no_template = builder(chat_tokenizer("qwen"), template=None)
    with pytest.raises(ValueError, match="set model.chat_template"):
        no_template.build({**sample, "json": json.dumps(records()[2]).encode()})


def test_llava_builtin_templates_render_as_llava_does(tmp_path):
    """``v1``: LLaVA's conv_vicuna_v1 prompt (system, ``USER: ... ASSISTANT: reply</s>``), the replies and
    their eos trained; ``plain``: the image then the caption and a newline, the caption trained."""
    tok = chat_tokenizer("llama")
    image = tok.convert_tokens_to_ids("<image>")
    messages = [m for m in CONVERSATION if m["role"] != "system"]
    system = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions."
    )
    llava = f"<s>{system} USER: <image>\nwhat colour is it ASSISTANT: red</s>"
    llava += "USER: and now ASSISTANT: blue and red</s>"
    v1 = ChatEncoder(tok, resolve_chat_template("v1", tok), "<image>")
    assert v1.render(messages) == llava
    assert v1.render(messages[:1], prompt=True) == llava.split(" red</s>")[0]
    enc = v1.encode("v", messages, lambda k: [image])
    assert tok.convert_ids_to_tokens([i for i, t in zip(enc.ids, enc.targets) if t]) == [
        "red",
        "</s>",
        "blue",
        "and",
        "red",
        "</s>",
    ]
    plain = ChatEncoder(tok, resolve_chat_template("plain", tok), "<image>")
    caption = [
        {"role": "user", "content": "<image>\nwhat colour"},
        {"role": "assistant", "content": "a red shape"},
    ]
    assert plain.render(caption) == "<s><image>a red shape\n"
    enc = plain.encode("p", caption, lambda k: [image] * 3)
    v = tok.get_vocab()
    assert enc.ids == [tok.bos_token_id, image, image, image, v["a"], v["red"], v["shape"]]
    assert enc.targets == [False] * 4 + [True] * 3
    # a Jinja file names a template too; an unknown name is refused
    (tmp_path / "t.jinja").write_text(QWEN)
    assert resolve_chat_template(str(tmp_path / "t.jinja"), tok) == QWEN
    with pytest.raises(ValueError, match="neither a built-in"):
        resolve_chat_template("v2", tok)


def test_the_readme_configs_of_each_data_format_load(tmp_path):
    """Each YAML block of the README's "Train on conversations", put into the shipped conversation config."""
    import re

    import yaml

    from training.runner.paths import ROOT
    from training.tasks.vlm_config import load_vlm_config

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Train on conversations")[1].split("\n## ")[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 4
    base = yaml.safe_load((ROOT / "configs" / "vlm" / "tiny_conversations.yaml").read_text())
    for key in ("train_json", "image_folder"):
        base["data"].pop(key)
    for i, block in enumerate(blocks):
        part = yaml.safe_load(block)
        config = {**base, **{k: {**base.get(k, {}), **v} for k, v in part.items()}}
        path = tmp_path / f"{i}.yaml"
        path.write_text(yaml.safe_dump(config))
        cfg = load_vlm_config(path)
        assert (cfg.data.train_shards, cfg.data.train_json) == (
            part["data"].get("train_shards", ""),
            part["data"].get("train_json"),
        )
        if "sources" in part["data"]:
            assert [s["weight"] for s in cfg.data.sources] == [3.0, 1.0]
        assert cfg.model.chat_template == part["model"]["chat_template"]


def test_missing_json_inputs_fail_before_training_naming_the_key(tmp_path):
    from training.runner.paths import ROOT
    from training.tasks.vlm import VLMTask
    from training.tasks.vlm_config import load_vlm_config

    folder, jsonl, _, _ = write_sources(tmp_path)
    config = ROOT / "configs" / "vlm" / "tiny_conversations.yaml"
    cases = [
        ([f"data.train_json={tmp_path / 'none.jsonl'}"], "data.train_json .*none.jsonl is not a file"),
        (
            [f"data.train_json={jsonl}", f"data.image_folder={tmp_path / 'none'}"],
            "data.image_folder .* folder",
        ),
        (
            [f"data.train_json={jsonl}", f"data.image_folder={folder}", "model.chat_template=none.jinja"],
            "model.chat_template none.jinja is not a file",
        ),
    ]
    for extra, message in cases:
        task = VLMTask(load_vlm_config(config, extra))
        with pytest.raises(FileNotFoundError, match=message):
            task.check_inputs()


def test_each_image_of_a_conversation_takes_its_own_sizes_tokens_in_the_anyres_layout():
    """The messages record of two images (12x30 and 32x20) in LLaVA-NeXT's anyres layout: each image's run
    of placeholders is what transformers' LlavaNextProcessor gives its size, in order, and the batch
    carries both images' crops (as that processor makes them) and sizes."""
    import itertools

    from tests.helpers import anyres_reference as AR
    from vision_tower import load_image

    layout = layout_for(ConnectorConfig("linear", 8, 16), 16, 4, "anyres")  # 16 tokens per 16 px crop
    tok = chat_tokenizer("qwen")
    b = VLMBuilder(
        tok,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        layout=layout,
        images=PixelImages(ImageProcessor(image_size=16, backend="torchvision"), layout, patch_size=4),
        max_length=200,
        causal=True,
        chat_template=QWEN,
    )
    sizes = [(12, 30), (32, 20)]
    shapes = [make_sample("train", i, image_size=32).image for i in range(2)]
    blobs = [png(shape.resize((w, h))) for shape, (h, w) in zip(shapes, sizes, strict=True)]
    sample = {"__key__": "m", "__url__": "u", "json": json.dumps(records()[1]).encode()}
    item = b.build({**sample, "0.png": blobs[0], "1.png": blobs[1]})
    pins = [[r * 16, c * 16] for r, c in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
    reference = AR.llava_next_processor("torchvision", 16, 4, pins)
    image = reference.tokenizer.convert_tokens_to_ids(AR.IMAGE)
    outs = [reference(images=load_image(blob), text=AR.IMAGE, return_tensors="pt") for blob in blobs]
    counts = [int((out["input_ids"] == image).sum()) for out in outs]
    assert counts[0] != counts[1]
    placeholder = tok.convert_tokens_to_ids("<image>")
    runs = itertools.groupby(item.input_ids, lambda t: t == placeholder)
    runs = [len(list(g)) for is_image, g in runs if is_image]
    assert runs == counts
    batch = b.collate([item])
    assert batch["image_sizes"].tolist() == [list(s) for s in sizes]
    assert torch.equal(batch["pixel_values"], torch.cat([out["pixel_values"][0] for out in outs]))
