"""The chat template a VLM trains with, as an export's processor applies it.

Training renders a conversation with the template (Jinja text) and tokenizes the rendering without letting the
tokenizer add its own bos or eos: the template writes what it wants (``{{ bos_token }}``). A transformers
user of an export calls ``processor.apply_chat_template(messages)`` with content blocks
(``{"type": "image"}``, ``{"type": "text", "text": ...}``) and then ``processor(images=..., text=...)``, whose
tokenizer adds its bos. :func:`processor_template` wraps the training template so that this call gives the
training ids: content blocks become text with the image token where the images are (as training reads them),
and a bos the template writes first is left out of the text when the tokenizer adds it anyway.
"""

from __future__ import annotations

from typing import Any

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
    """Whether ``tokenizer(text)`` (special tokens added, as a processor calls it) starts with its bos."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]


def processor_template(template: str, tokenizer: Any, image_token: str) -> str:
    """The training ``template`` as a processor applies it: messages whose content is a list of blocks are
    read as text with ``image_token`` for each image block (training's reading of the messages format), and,
    when ``tokenizer`` adds a bos itself, a bos the template writes first is left out of the text."""
    body = "{{ '' }}" + template  # a leading newline of the template is kept (no block tag trims it)
    if adds_bos(tokenizer):
        body = _WITHOUT_FIRST_BOS.replace("__TEMPLATE__", template)
    return _BLOCKS.replace("__IMAGE__", repr(image_token)) + body
