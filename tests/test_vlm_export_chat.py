"""Exports a processor can drive: the chat template a VLM trains with travels in its LLaVA and native exports,
so that transformers' ``AutoProcessor`` (``apply_chat_template``, then the processor call) builds the ids
training built for the same conversation, with a tokenizer that adds bos (Llama) and one that does not
(Qwen2); ``LlavaForConditionalGeneration`` continues them as the VLM does; ``eval vlm`` of an export needs
no ``--chat-template``."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from connectors import VisionLanguageModel
from tests.helpers import vlm_reference as R
from tests.helpers.shards import write_tar
from tests.helpers.vlm_data import png
from training.data.chat import PLAIN, V1
from training.data.vlm import builder_for
from vision_tower import ImageProcessor
from vision_tower.cli import main

WORDS = ["user", "assistant", "system", "USER:", "ASSISTANT:", "be", "brief", "what", "colour", "is", "it"]
WORDS += ["red", "blue", "and", "now", "A", "chat", "between"]
# Qwen2's layout: no bos, <|im_start|>role ... <|im_end|>; the tokenizer's own template
QWEN = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: ``llama`` adds bos <s> to what it tokenizes (as Llama's do) and has no chat
    template of its own; ``mistral`` too, and marks the start of a piece as SentencePiece does (Llama 2,
    Mistral: "▁what" first in a string, "what" after a special token); ``qwen`` adds nothing, eos
    <|im_end|>, and has :data:`QWEN` as its template."""
    words = ["<unk>", "<s>", "</s>", "<pad>", *WORDS]
    if kind == "mistral":
        words += ["▁" + w for w in WORDS] + ["\nwhat", "▁\nwhat", "▁"]
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "mistral":
        model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    if kind in ("llama", "mistral"):
        model.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    else:
        specials = {"eos_token": "<|im_end|>", "pad_token": "<pad>"}
    tok = PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", **specials)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<image>"]})
    if kind == "qwen":
        tok.chat_template = QWEN
    return tok


# (decoder family, the model's chat template: the built-in v1 given as model.chat_template, or the
# tokenizer's own)
KINDS = {"llama": ("llama", V1), "mistral": ("llama", V1), "qwen": ("qwen2", None)}
USER = [{"type": "image"}, {"type": "text", "text": "\nwhat colour is it"}]
MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": USER},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "and now"},
    {"role": "assistant", "content": "blue"},
]


def _vlm(kind: str, image_layout: str = "fixed") -> VisionLanguageModel:
    family, template = KINDS[kind]
    tower = R.tower(seed=7)
    tower.feature_layer = -2
    vlm = VisionLanguageModel(
        tower,
        "mlp2x_gelu",
        R.decoder(family, seed=3),
        attention="causal",
        tokenizer=tokenizer(kind),
        processor=ImageProcessor(image_size=32),
        chat_template=template,
        image_layout=image_layout,
    )
    R.randomize_(vlm.connector, seed=8, scale=0.3)
    return vlm.eval()


def _image() -> Image.Image:
    image = Image.new("RGB", (40, 30), (200, 30, 60))
    image.paste((20, 90, 200), (5, 5, 20, 25))
    return image


def _training_ids(vlm: VisionLanguageModel) -> tuple[list[int], list[bool], torch.Tensor]:
    """Ids, targets and pixels of :data:`MESSAGES` as training builds them (a messages-format record in a
    shard)."""
    builder = builder_for(vlm, max_length=200)
    meta = {"id": "c0", "messages": MESSAGES, "images": ["x.png"]}
    item = builder.build_conversation({"__key__": "c0", "png": png(_image())}, meta)
    return item.input_ids, item.targets, item.images


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen"])
def test_the_llava_export_s_processor_builds_the_training_ids(kind, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    vlm = _vlm(kind)
    ids, targets, pixels = _training_ids(vlm)
    bos = vlm.tokenizer.bos_token_id
    assert (ids[0] == bos) == (kind != "qwen") and ids.count(bos or -1) == (kind != "qwen")
    if kind == "mistral":  # the text after the image is no piece's start
        assert vlm.tokenizer.convert_tokens_to_ids("\nwhat") in ids
    out = tmp_path / "llava"
    vlm.save_pretrained(out, format="llava")
    processor = AutoProcessor.from_pretrained(out)
    # the prompt of each reply: training's ids up to the reply's first target token
    starts = [i for i, t in enumerate(targets) if t and (i == 0 or not targets[i - 1])]
    assert len(starts) == 2
    for turns, start in zip((2, 4), starts, strict=True):
        text = processor.apply_chat_template(MESSAGES[:turns], add_generation_prompt=True)
        batch = processor(images=[_image()], text=text, return_tensors="pt")
        assert batch["input_ids"][0].tolist() == ids[:start], (text, batch["input_ids"][0].tolist(), ids)
        torch.testing.assert_close(batch["pixel_values"], pixels, atol=1e-5, rtol=0)
    # transformers' model continues the processor's ids as the VLM does (greedy)
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    hf.generation_config.eos_token_id = None
    theirs = hf.generate(**batch, max_new_tokens=4, do_sample=False, suppress_tokens=[vlm.image_token_id])
    mine = vlm.generate(
        batch["pixel_values"], input_ids=batch["input_ids"], max_new_tokens=4, eos_token_id=[]
    )
    assert torch.equal(theirs[:, batch["input_ids"].shape[1] :], mine)
    # the tokenizer keeps the template as training renders it; our loader reads it back from the export
    template = QWEN if kind == "qwen" else V1
    assert AutoProcessor.from_pretrained(out).tokenizer.chat_template == template
    assert VisionLanguageModel.from_pretrained(out).chat_template == template


def test_a_template_without_bos_for_a_tokenizer_that_adds_one_is_named(tmp_path):
    """Llama's tokenizer (adds bos) with Qwen's template (writes none): training's ids have no bos, so the
    export says to call the processor with add_special_tokens=False, which then gives them."""
    from transformers import AutoProcessor

    vlm = _vlm("llama")
    vlm.chat_template = QWEN
    ids, targets, _ = _training_ids(vlm)
    assert vlm.tokenizer.bos_token_id not in ids
    with pytest.warns(
        UserWarning, match="writes no bos but the tokenizer adds '<s>'.*add_special_tokens=False"
    ):
        vlm.save_pretrained(tmp_path, format="llava")
    processor = AutoProcessor.from_pretrained(tmp_path)
    text = processor.apply_chat_template(MESSAGES[:2], add_generation_prompt=True)
    batch = processor(images=[_image()], text=text, add_special_tokens=False)
    assert batch["input_ids"][0] == ids[: targets.index(True)]


def test_the_native_export_keeps_the_template_and_eval_reads_it(tmp_path, capsys):
    """A VLM trained with v1 (not its tokenizer's template) saved as native: the template comes back, a
    builder renders with it by default, and ``eval vlm`` without ``--chat-template`` gives the loss it gives
    with ``--chat-template v1`` (and another than with ``plain``)."""
    vlm = _vlm("llama")
    assert builder_for(vlm, max_length=200).chat_template == V1  # what training's builder renders with
    out = tmp_path / "native"
    vlm.save_pretrained(out)
    back = VisionLanguageModel.from_pretrained(out)
    assert back.chat_template == V1 and vlm.tokenizer.chat_template is None  # the live tokenizer untouched
    assert builder_for(back, max_length=200).chat_template == V1
    assert builder_for(back, max_length=200, chat_template="plain").chat_template == PLAIN
    record = {"id": "c0", "image": "x.png", "conversations": []}
    for m in MESSAGES[1:]:
        text = "<image>\nwhat colour is it" if m is MESSAGES[1] else m["content"]
        record["conversations"].append({"from": "human" if m["role"] == "user" else "gpt", "value": text})
    write_tar(
        tmp_path / "val" / "val-000.tar",
        [("c0.png", png(_image())), ("c0.json", json.dumps(record).encode())],
    )
    losses = {}
    for flag in ([], ["--chat-template", "v1"], ["--chat-template", "plain"]):
        args = ["eval", "vlm", "--model", str(out), "--shards", str(tmp_path / "val"), "--dtype", "float32"]
        assert main([*args, "--max-new-tokens", "2", *flag]) == 0
        printed = capsys.readouterr().out  # one JSON document (after DeepSpeed's accelerator line, if any)
        losses[" ".join(flag)] = json.loads(printed[printed.index("{\n") :])["val_loss"]
    assert losses[""] == losses["--chat-template v1"] != losses["--chat-template plain"], losses


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen"])
def test_generate_chat_prompts_as_training_renders_the_first_turn(kind, tmp_path, monkeypatch, capsys):
    """``vision-tower generate --chat`` on a native export continues the ids training builds for a one-turn
    conversation up to its reply (the saved template); ``--chat-template plain`` renders with that one."""
    import connectors.generation as G

    vlm = _vlm(kind)
    builder = builder_for(vlm, max_length=200)
    turns = [{"from": "human", "value": "what colour is it"}, {"from": "gpt", "value": "red"}]
    item = builder.build_conversation({"__key__": "c", "png": png(_image())}, {"conversations": turns})
    out, image = tmp_path / "native", tmp_path / "x.png"
    vlm.save_pretrained(out)
    _image().save(image)
    seen = []
    real = G.generate
    monkeypatch.setattr(
        G, "generate", lambda *a, **kw: seen.append(kw["input_ids"][0].tolist()) or real(*a, **kw)
    )
    args = ["generate", "--model", str(out), "--image", str(image), "--prompt", "what colour is it"]
    for flag in (["--chat"], ["--chat-template", "plain"]):
        assert main([*args, "--max-new-tokens", "2", "--dtype", "float32", *flag]) == 0
    capsys.readouterr()
    assert seen[0] == item.prompt_ids
    bos = [vlm.tokenizer.bos_token_id] if kind != "qwen" else []
    assert seen[1] == bos + vlm.image_prompt_ids((32, 32))  # plain: bos, the image; the user's words dropped


def _second_image() -> Image.Image:
    image = Image.new("RGB", (30, 40), (20, 160, 40))
    image.paste((250, 250, 20), (8, 2, 22, 30))
    return image


@pytest.mark.parametrize("kind", ["llama", "qwen"])
def test_generate_takes_several_images_in_one_prompt(kind, tmp_path, monkeypatch, capsys):
    """``vision-tower generate --image a --image b --prompt "<image> and <image> ..."``: the prompt's ids are
    those transformers' LLaVA processor builds from the export for both images, and the tokens those
    ``LlavaForConditionalGeneration`` generates; with ``--chat``, the ids training builds for a two-image
    conversation up to its reply."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import connectors.generation as G

    vlm = _vlm(kind)
    out = tmp_path / "llava"
    vlm.save_pretrained(out, format="llava")
    files = [tmp_path / "a.png", tmp_path / "b.png"]
    _image().save(files[0])
    _second_image().save(files[1])
    prompt = "<image> and <image> what colour is it"

    processor = AutoProcessor.from_pretrained(out)
    batch = processor(images=[_image(), _second_image()], text=prompt, return_tensors="pt")
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    hf.generation_config.eos_token_id = None
    theirs = hf.generate(**batch, max_new_tokens=4, do_sample=False, suppress_tokens=[vlm.image_token_id])

    seen = []
    real = G.generate
    monkeypatch.setattr(G, "generate", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    args = ["generate", "--model", str(out), "--image", str(files[0]), "--image", str(files[1])]
    args += ["--max-new-tokens", "4", "--dtype", "float32"]
    assert main([*args, "--prompt", prompt]) == 0
    printed = capsys.readouterr().out.strip()
    assert seen[0]["input_ids"][0].tolist() == batch["input_ids"][0].tolist()
    mine = theirs[0, batch["input_ids"].shape[1] :]
    assert printed == vlm.tokenizer.decode(mine, skip_special_tokens=True).strip()

    # --chat: the ids of a two-image conversation as training builds them, up to the reply
    builder = builder_for(vlm, max_length=200)
    turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": "red"}]
    sample = {"__key__": "c", "0.png": png(_image()), "1.png": png(_second_image())}
    item = builder.build_conversation(sample, {"conversations": turns})
    assert main([*args, "--prompt", prompt, "--chat"]) == 0
    assert seen[1]["input_ids"][0].tolist() == item.prompt_ids
    # one image short is refused in one line
    assert main([*args[:4], *args[6:], "--prompt", prompt]) == 2
    assert "1 image(s) for prompts that take 2" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen"])
def test_a_single_turn_prompt_is_tokenized_as_the_llava_processor_does(kind, tmp_path):
    """A LLaVA-style prompt holding ``<image>`` (single-turn training rows, ``generate``): the text around the
    image token is read in one piece, as the export's processor reads it, so a SentencePiece tokenizer gives
    ``\\nwhat`` after the image, not ``▁\\nwhat``; special tokens written in the text stay text."""
    from transformers import AutoProcessor

    vlm = _vlm(kind)
    vlm.save_pretrained(tmp_path, format="llava")
    processor = AutoProcessor.from_pretrained(tmp_path)
    builder = builder_for(vlm, max_length=200)
    image = vlm.image_prompt_ids((32, 32))
    for prompt in ("USER: <image>\nwhat colour is it ASSISTANT:", "<image>\nwhat colour is it"):
        theirs = processor(images=[_image()], text=prompt)["input_ids"][0]
        assert builder.prefix_ids(prompt, image) == theirs, prompt
    if kind == "mistral":
        assert vlm.tokenizer.convert_tokens_to_ids("\nwhat") in theirs
    # a special token spelled in the text is text: not the tokenizer's eos
    eos = vlm.tokenizer.eos_token
    spelled = builder.prefix_ids(f"<image> what {eos}", image)
    assert vlm.tokenizer.eos_token_id not in spelled


@pytest.mark.parametrize("fmt, layout", [("llava_next", "anyres"), ("llava_onevision", "anyres_max_9")])
def test_the_tiled_llava_exports_processors_build_the_training_ids(fmt, layout, tmp_path):
    """LLaVA-NeXT and OneVision exports: their processor applies the training template and tiles the image
    into the ids training built for the conversation (a 40x30 image: the layout's base crop and tiles)."""
    from transformers import AutoProcessor

    vlm = _vlm("llama", layout)
    ids, targets, _ = _training_ids(vlm)
    assert ids.count(vlm.image_token_id) == vlm.tokens_for((30, 40)) > vlm.num_image_tokens
    vlm.save_pretrained(tmp_path, format=fmt)
    processor = AutoProcessor.from_pretrained(tmp_path)
    text = processor.apply_chat_template(MESSAGES[:2], add_generation_prompt=True)
    batch = processor(images=[_image()], text=text)
    assert batch["input_ids"][0] == ids[: targets.index(True)]
