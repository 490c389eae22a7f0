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

import warnings
from typing import Any

from transformers.utils.chat_template_utils import render_jinja_template

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
