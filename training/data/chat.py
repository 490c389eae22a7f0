"""Conversations rendered through a chat template, verified, with the loss on the assistant's tokens.

A conversation (LLaVA's ``conversations`` of ``from``/``value`` or the ``messages`` of ``role``/``content``)
becomes ``role``/``content`` messages, is rendered with the decoder tokenizer's Jinja chat template (or
``model.chat_template``: the built-in ``plain`` or ``v1`` of LLaVA, or a Jinja file) and tokenized so that:

- the text the messages hold is tokenized as text (special tokens written in it are split into ordinary
  pieces, never parsed), and only the template's own text is parsed for special tokens;
- every ``<image>`` (in a message or written by the template) becomes the image's tokens, by id;
- the assistant mask comes from the template's ``{% generation %}`` spans when it has them, else from the
  assistant replies' places found by rendering the conversation turn by turn;
- the tokens of the turn-by-turn renderings (each prefix of the conversation, with the generation prompt
  before each reply, as one generates) must equal those of the whole rendering, else the sample is bad
  (:class:`TemplateMismatch`, naming the sample and the first differing token).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.utils.chat_template_utils import render_jinja_template

from .shards import SkipSample

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# private-use characters: they mark a message's text in a rendering while its place is looked for
_OPEN, _CLOSE = "\ue000", "\ue001"
_END = _OPEN + _CLOSE
_MARKS = re.compile(f"{_OPEN}(\\d+)?{_CLOSE}")  # a message's start (with its index) or end

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


class TemplateMismatch(SkipSample):
    """The turn-by-turn tokens differ from the whole rendering's (or the template changed the text)."""

    def __init__(self, detail: str) -> None:
        super().__init__("template_mismatch", detail)


def resolve_chat_template(spec: str | None, tokenizer: Any) -> str | None:
    """The Jinja text of ``model.chat_template``: a built-in name, a Jinja file, or None for the tokenizer's
    own (None when it has none)."""
    if spec is None:
        own = getattr(tokenizer, "chat_template", None)
        return own if isinstance(own, str) else None
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"model.chat_template {spec!r} is neither a built-in ({', '.join(BUILTIN_TEMPLATES)}) "
            "nor a Jinja file"
        )
    return path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- samples


@dataclass
class Conversation:
    messages: list[dict[str, str]]  # role, content (str)
    images: list[str]  # file names as the sample gives them (empty in shards without names)


def is_conversation(meta: Any) -> bool:
    return isinstance(meta, dict) and ("conversations" in meta or "messages" in meta)


def read_conversation(meta: dict[str, Any], image_token: str) -> Conversation:
    """LLaVA's ``{"image", "conversations": [{"from", "value"}]}`` or ``{"messages": [{"role", "content"}],
    "images"}`` as messages; content blocks (``{"type": "image"}``, ``{"type": "text", "text"}``) become text
    with ``image_token`` where the images are. A malformed one is skipped (``bad_conversation``)."""
    turns = meta.get("conversations", meta.get("messages"))
    keys = ("from", "value") if "conversations" in meta else ("role", "content")
    if not isinstance(turns, list) or not turns:
        raise SkipSample("bad_conversation", f"{keys and 'conversations/messages'} is not a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or keys[0] not in turn or keys[1] not in turn:
            raise SkipSample(
                "bad_conversation", f"turn {i} is not an object with {keys[0]!r} and {keys[1]!r}"
            )
        role = ROLES.get(turn[keys[0]])
        if role is None:
            raise SkipSample(
                "bad_conversation", f"turn {i}: unknown role {turn[keys[0]]!r}; known: {sorted(ROLES)}"
            )
        messages.append({"role": role, "content": _content_text(turn[keys[1]], image_token, i)})
    if not any(m["role"] == "assistant" for m in messages):
        raise SkipSample("bad_conversation", "no assistant turn: nothing to train on")
    images = meta.get("image", meta.get("images", []))
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise SkipSample(
            "bad_conversation", f"image(s) must be a file name or a list of them, got {images!r}"
        )
    return Conversation(messages, images)


def _content_text(content: Any, image_token: str, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "image":
                parts.append(image_token)
            elif kind == "text" and isinstance(block.get("text"), str):
                parts.append(block["text"])
            else:
                raise SkipSample(
                    "bad_conversation", f"turn {i}: content block {block!r} is not image or text"
                )
        return "".join(parts)
    raise SkipSample("bad_conversation", f"turn {i}: content is a {type(content).__name__}, not text")


def place_images(messages: list[dict[str, str]], n_images: int, image_token: str) -> list[dict[str, str]]:
    """LLaVA's convention: images whose places the text does not give go first in the first user turn;
    any other count of placeholders than of images is a bad sample."""
    found = sum(m["content"].count(image_token) for m in messages)
    if found == n_images:
        return messages
    if found == 0:
        first = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first is not None:
            out = [dict(m) for m in messages]
            out[first]["content"] = (image_token + "\n") * n_images + out[first]["content"]
            return out
    raise SkipSample(
        "bad_conversation", f"the text holds {found} {image_token} placeholders for {n_images} image(s)"
    )


# ----------------------------------------------------------------------------- rendering


@dataclass
class Encoded:
    ids: list[int]
    targets: list[bool]  # True on the assistant's tokens (the loss)


class ChatEncoder:
    """Renders and tokenizes conversations with ``template`` (Jinja); ``image_ids(k)`` are the ids the
    k-th ``image_token`` of a conversation becomes."""

    def __init__(self, tokenizer: Any, template: str, image_token: str) -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("conversations need a fast (tokenizers) tokenizer: it gives the token offsets")
        self.tokenizer, self.template, self.image_token = tokenizer, template, image_token
        self.generation = bool(GENERATION_TAG.search(template))
        specials = dict(tokenizer.special_tokens_map)
        specials.setdefault("bos_token", "")  # a tokenizer without bos (Qwen2): templates write it as nothing
        specials.setdefault("eos_token", "")
        self.specials = {k: v for k, v in specials.items() if isinstance(v, str)}

    def render(self, messages: list[dict[str, str]], *, prompt: bool = False, spans: bool = False):
        try:
            texts, indices = render_jinja_template(
                conversations=[messages],
                chat_template=self.template,
                return_assistant_tokens_mask=spans,
                add_generation_prompt=prompt,
                **self.specials,
            )
        except Exception as exn:  # noqa: BLE001 - the template's own error (raise_exception, undefined...)
            raise SkipSample("template_mismatch", f"the chat template fails on it: {exn}") from exn
        return (texts[0], indices[0]) if spans else texts[0]

    def encode(
        self, key: str, messages: list[dict[str, str]], image_ids: Callable[[int], list[int]]
    ) -> Encoded:
        whole, gen_spans = (
            self.render(messages, spans=True) if self.generation else (self.render(messages), [])
        )
        kinds = self._text_spans(key, messages, whole)
        ids, offsets = self._tokenize(whole, 0, len(whole), kinds, image_ids)
        # turn by turn: each prefix of the conversation, the generation prompt before each reply
        cuts, replies = [], []
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                start = self.render(messages[:k], prompt=True) if k else ""
                cuts.append(start)
            end = self.render(messages[: k + 1])
            if message["role"] == "assistant":
                replies.append((len(cuts[-1]), len(end)))
            cuts.append(end)
        joined, pos = [], 0
        for text in cuts:
            joined.append(text[pos:])
            pos = len(text)
        turned = "".join(joined)
        if turned != whole:
            d = next(
                (i for i, (a, b) in enumerate(zip(turned, whole)) if a != b), min(len(turned), len(whole))
            )
            at = next((i for i, (_, end) in enumerate(offsets) if end > d), len(offsets))
            raise TemplateMismatch(
                f"sample {key}: turn-by-turn rendering differs from the whole at token {at} (character {d}): "
                f"{turned[d : d + 40]!r} against {whole[d : d + 40]!r}"
            )
        pieces: list[int] = []
        bounds = sorted({len(t) for t in cuts if 0 < len(t) < len(whole)})
        for a, b in zip([0, *bounds], [*bounds, len(whole)]):
            pieces += self._tokenize(
                whole, a, b, kinds, image_ids, first_image=_images_before(whole, a, self.image_token)
            )[0]
        if pieces != ids:
            at = next((i for i, (a, b) in enumerate(zip(pieces, ids)) if a != b), min(len(pieces), len(ids)))
            raise TemplateMismatch(
                f"sample {key}: turn-by-turn tokens differ from the whole rendering's at token {at} "
                f"({pieces[at : at + 5]} against {ids[at : at + 5]})"
            )
        spans = gen_spans if self.generation else replies
        targets = [any(s < hi and e > lo for lo, hi in spans) for s, e in offsets]  # a token touching a span
        return Encoded(ids, targets)

    def _text_spans(self, key: str, messages: list[dict[str, str]], whole: str) -> list[tuple[int, int]]:
        """Where the messages' own text lies in ``whole`` (to be tokenized as text): each message's text is
        rendered between markers, which are then taken out; the template must write the text as given (or
        stripped), or leave it out."""
        for strip in (False, True):
            marked = [
                {**m, "content": f"{_OPEN}{i}{_CLOSE}{m['content'].strip() if strip else m['content']}{_END}"}
                for i, m in enumerate(messages)
            ]
            skeleton = self.render(marked)
            spans, out, pos, start = [], [], 0, None
            for match in _MARKS.finditer(skeleton):
                out.append(skeleton[pos : match.start()])
                pos = match.end()
                if match.group(1) is not None:
                    start = sum(map(len, out))
                elif start is not None:
                    spans.append((start, sum(map(len, out))))
                    start = None
            out.append(skeleton[pos:])
            if "".join(out) == whole:
                return spans
        raise TemplateMismatch(
            f"sample {key}: the chat template does not write the messages' text as given (nor stripped), so "
            "their text cannot be kept apart from the template's special tokens"
        )

    def _tokenize(
        self,
        text: str,
        a: int,
        b: int,
        texts: list[tuple[int, int]],
        image_ids: Callable[[int], list[int]],
        first_image: int = 0,
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character spans of ``text[a:b]``: the messages' text (``texts``) as text, the template's
        with its special tokens parsed, each image token as the image's ids."""
        cuts = sorted({a, b, *(x for span in texts for x in span if a < x < b)})
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        image = first_image
        for lo, hi in zip(cuts, cuts[1:]):
            as_text = any(s <= lo and hi <= e for s, e in texts)
            pos = lo
            for part in re.split(f"({re.escape(self.image_token)})", text[lo:hi]):
                if part == self.image_token:
                    new = image_ids(image)
                    image += 1
                    ids += new
                    offsets += [(pos, pos + len(part))] * len(new)
                elif part:
                    enc = self.tokenizer(
                        part,
                        add_special_tokens=False,
                        split_special_tokens=as_text,
                        return_offsets_mapping=True,
                    )
                    ids += enc["input_ids"]
                    offsets += [(pos + s, pos + e) for s, e in enc["offset_mapping"]]
                pos += len(part)
        return ids, offsets


def _images_before(text: str, pos: int, image_token: str) -> int:
    return text[:pos].count(image_token)
