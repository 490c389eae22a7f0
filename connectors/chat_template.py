"""The chat template a VLM trains with: the built-in ones, as an export's processor applies it, and a chat
prompt's ids for generation.

Training renders a conversation with the template (Jinja text) and tokenizes the rendering without letting the
tokenizer add its own bos or eos: the template writes what it wants (``{{ bos_token }}``). A transformers
user of an export calls ``processor.apply_chat_template(messages)`` with content blocks
(``{"type": "image"}``, ``{"type": "text", "text": ...}``) and then ``processor(images=..., text=...)``, whose
tokenizer adds its bos. :func:`processor_template` wraps the training template so that this call gives the
training ids: content blocks become text with the image token where the images are (as training reads them),
and a bos the template writes first is left out of the text when the tokenizer adds it anyway.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from transformers.utils.chat_template_utils import render_jinja_template

# LLaVA's pretraining layout (conv_llava_plain): the images, then the caption and a newline; the user's
# words are dropped, only the reply trains
PLAIN = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}"
    "{{ '<image>' * (m.content.count('<image>')) }}"
    "{% elif m.role == 'assistant' %}{% generation %}{{ m.content }}\n{% endgeneration %}{% endif %}"
    "{% endfor %}"
)
# LLaVA's conversation layout (conv_vicuna_v1): system, then ``USER: ... ASSISTANT: ...</s>`` turns
V1 = (
    "{{ bos_token }}{% if messages[0].role == 'system' %}{{ messages[0].content }}"
    "{% set turns = messages[1:] %}{% else %}A chat between a curious user and an artificial intelligence "
    "assistant. The assistant gives helpful, detailed, and polite answers to the user's questions."
    "{% set turns = messages %}{% endif %} {% for m in turns %}{% if m.role == 'user' %}USER: "
    "{{ m.content }} {% else %}ASSISTANT: {% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
BUILTIN_TEMPLATES = {"plain": PLAIN, "v1": V1}

# content blocks -> one string, images as the image token (``__IMAGE__``), text blocks' text, in order
_BLOCKS = (
    "{% set vt_ns = namespace(messages=[]) %}"
    "{% for vt_m in messages %}"
    "{% if vt_m.content is string or vt_m.content is none %}"
    "{% set vt_ns.messages = vt_ns.messages + [vt_m] %}"
    "{% else %}"
    "{% set vt_text = namespace(value='') %}"
    "{% for vt_b in vt_m.content %}"
    "{% if vt_b.type == 'image' %}{% set vt_text.value = vt_text.value + __IMAGE__ %}"
    "{% elif vt_b.type == 'text' %}{% set vt_text.value = vt_text.value + vt_b.text %}{% endif %}"
    "{% endfor %}"
    "{% set vt_ns.messages = vt_ns.messages + [{'role': vt_m.role, 'content': vt_text.value}] %}"
    "{% endif %}"
    "{% endfor %}"
    "{% set messages = vt_ns.messages %}"
)
# ``{{ '' }}`` beside the template keeps its first and last whitespace from the block tags' trimming
_WITHOUT_FIRST_BOS = (
    "{% set vt_rendered %}{{ '' }}__TEMPLATE__{{ '' }}{% endset %}"
    "{% if bos_token and vt_rendered.startswith(bos_token) %}{{ vt_rendered[bos_token | length :] }}"
    "{% else %}{{ vt_rendered }}{% endif %}"
)


def adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer(text)`` (special tokens added, as a processor calls it) adds its bos in front, and
    nothing else."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return tokenizer("a", add_special_tokens=True)["input_ids"] == [bos, *plain]


def encode_rendering(
    tokenizer: Any, text: str, bos_added: bool | None = None
) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and character spans of a chat template's rendering ``text``, tokenized in one piece as training
    tokenizes it: special tokens parsed, none added; but a rendering that starts with the bos the tokenizer
    adds itself (``bos_added``: :func:`adds_bos`, computed when None) is tokenized as the tokenizer tokenizes
    the text after it, bos added: a SentencePiece tokenizer then marks its first word as a string's start
    ("▁A" after bos, as Llama's and LLaVA's own encodings have it, and as an export's processor gives it);
    other tokenizers give the same ids either way."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and (adds_bos(tokenizer) if bos_added is None else bos_added):
        enc = tokenizer(text[len(bos) :], add_special_tokens=True, return_offsets_mapping=True)
        spans = [(s + len(bos), e + len(bos)) for s, e in enc["offset_mapping"][1:]]
        return enc["input_ids"], [(0, len(bos)), *spans]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


def writes_bos(template: str, tokenizer: Any) -> bool | None:
    """Whether ``template`` starts a one-turn conversation with the tokenizer's bos (None: the template fails
    on one)."""
    specials = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    try:
        (text,), _ = render_jinja_template(
            conversations=[[{"role": "user", "content": "a"}]],
            chat_template=template,
            add_generation_prompt=True,
            **{"bos_token": "", "eos_token": "", **specials},
        )
    except Exception:  # noqa: BLE001 - the template's own error (raise_exception on this conversation...)
        return None
    return bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)


def processor_template(template: str, tokenizer: Any, image_token: str) -> str:
    """The training ``template`` as a processor applies it: messages whose content is a list of blocks are
    read as text with ``image_token`` for each image block (training's reading of the messages format), and,
    when ``tokenizer`` adds a bos itself, a bos the template writes first is left out of the text. A template
    that writes no bos for a tokenizer that adds one is warned about: the processor's call adds a bos that
    training did not (``add_special_tokens=False`` leaves it out)."""
    body = "{{ '' }}" + template  # a leading newline of the template is kept (no block tag trims it)
    if adds_bos(tokenizer):
        body = _WITHOUT_FIRST_BOS.replace("__TEMPLATE__", template)
        if writes_bos(template, tokenizer) is False:
            warnings.warn(
                f"the chat template writes no bos but the tokenizer adds {tokenizer.bos_token!r} to what it "
                "tokenizes: training's ids have none, so call the exported processor with "
                "add_special_tokens=False",
                stacklevel=3,
            )
    return _BLOCKS.replace("__IMAGE__", repr(image_token)) + body


def read_template(spec: str, key: str = "--chat-template") -> str:
    """The Jinja text of ``spec``: a built-in name (``plain``, ``v1``) or a Jinja file (``key`` names the
    option in the error)."""
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"{key} {spec!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) nor a Jinja file"
        )
    return path.read_text(encoding="utf-8")


def chat_prompt_ids(vlm: Any, prompt: str, image_size: Any, template: str | None = None) -> list[int]:
    """The ids of a one-turn chat about one image or several, as training builds a conversation's up to its
    first reply: ``prompt`` as the user's turn (each image where it writes the image token, else all before
    it, each with a newline, as training places images), rendered with ``template`` (default:
    ``vlm.chat_template``) and the generation prompt, tokenized as training tokenizes a rendering
    (:func:`encode_rendering`), each image token as the ids of an image of its size: ``image_size``
    (height, width), or one such size per image."""
    sizes = [image_size] if len(image_size) == 2 and not hasattr(image_size[0], "__len__") else image_size
    sizes = [tuple(int(v) for v in s) for s in sizes]
    template = template if template is not None else vlm.chat_template
    if template is None:
        raise ValueError(
            "this VLM has no chat template (none was saved with it, and its tokenizer has none): give one "
            f"(--chat-template {', '.join(BUILTIN_TEMPLATES)} or a Jinja file)"
        )
    tok = vlm.tokenizer
    image_token = tok.convert_ids_to_tokens(vlm.image_token_id)
    content = prompt if image_token in prompt else f"{image_token}\n" * len(sizes) + prompt
    specials = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    (text,), _ = render_jinja_template(
        conversations=[[{"role": "user", "content": content}]],
        chat_template=template,
        add_generation_prompt=True,
        **{"bos_token": "", "eos_token": "", **specials},
    )
    if text.count(image_token) != len(sizes):
        raise ValueError(
            f"the chat prompt holds {text.count(image_token)} {image_token} after the template, for "
            f"{len(sizes)} image(s): {text!r}"
        )
    ids, _ = encode_rendering(tok, text)  # in one piece, as training tokenizes it
    if ids.count(vlm.image_token_id) != len(sizes):
        raise ValueError(f"{image_token} is not one token in the tokenized chat prompt: {ids}")
    out, images = [], iter(sizes)
    for i in ids:
        out += list(vlm.image_prompt_ids(next(images))) if i == vlm.image_token_id else [i]
    return out
