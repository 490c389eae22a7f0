"""Conversations rendered through a chat template, verified, with the loss on the assistant's tokens.

A conversation (LLaVA's ``conversations`` of ``from``/``value`` or the ``messages`` of ``role``/``content``)
becomes ``role``/``content`` messages, is rendered with the decoder tokenizer's Jinja chat template (or
``model.chat_template``: the built-in ``plain`` or ``v1`` of LLaVA, or a Jinja file) and tokenized so that:

- the rendering is tokenized as a whole, as ``apply_chat_template`` does, except that special tokens are
  never parsed inside the messages' text (where that would happen, the messages' text is tokenized as
  text and the template's apart);
- every ``<image>`` (in a message or written by the template) becomes the image's tokens, by id;
- the assistant mask comes from the template's ``{% generation %}`` spans when it has them, else from the
  replies' places found by rendering the conversation turn by turn;
- verified: the rendering up to each reply (with the generation prompt, as one generates; and, turn by
  turn, up to each reply's end) must tokenize to the start of the whole rendering's tokens, else the
  sample is bad (:class:`TemplateMismatch`, naming the sample and the first differing token).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers.utils.chat_template_utils import render_jinja_template

# the built-ins (PLAIN, V1) are named here too
from connectors.chat_template import (  # noqa: F401
    BUILTIN_TEMPLATES,
    PLAIN,
    V1,
    adds_bos,
    encode_rendering,
    read_template,
)

from .shards import SkipSample

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# private-use characters: they mark a message's text in a rendering while its place is looked for
_OPEN, _CLOSE = "\ue000", "\ue001"
_END = _OPEN + _CLOSE
_MARKS = re.compile(f"{_OPEN}(\\d+)?{_CLOSE}")  # a message's start (with its index) or end


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
    return read_template(spec, key="model.chat_template")


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
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.bos_added = adds_bos(tokenizer)
        self.generation = bool(GENERATION_TAG.search(template))
        specials = dict(tokenizer.special_tokens_map)
        specials.setdefault("bos_token", "")  # a tokenizer without bos (Qwen2): templates write it as nothing
        specials.setdefault("eos_token", "")
        self.specials = {k: v for k, v in specials.items() if isinstance(v, str)}
        # ids that must never come from the messages' text
        self.special_ids = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if t.special
        }

    def render(
        self, messages: list[dict[str, str]], *, key: str = "", prompt: bool = False, spans: bool = False
    ):
        try:
            texts, indices = render_jinja_template(
                conversations=[messages],
                chat_template=self.template,
                return_assistant_tokens_mask=spans,
                add_generation_prompt=prompt,
                **self.specials,
            )
        except Exception as exn:  # noqa: BLE001 - the template's own error (raise_exception, undefined...)
            raise TemplateMismatch(f"sample {key}: the chat template fails on it: {exn}") from exn
        return (texts[0], indices[0]) if spans else texts[0]

    def encode(
        self, key: str, messages: list[dict[str, str]], image_ids: Callable[[int], list[int]]
    ) -> Encoded:
        """Ids and assistant mask of the whole conversation; :class:`TemplateMismatch` when the rendering up
        to a reply (as one generates it) does not tokenize to the start of the whole rendering's tokens."""
        if self.generation:
            whole, gen_spans = self.render(messages, key=key, spans=True)
        else:
            whole, gen_spans = self.render(messages, key=key), []
        texts = self._text_spans(key, messages, whole)
        ids, offsets = self._tokenize(whole, texts, image_ids)
        replies = []  # token ranges of the replies, turn by turn
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:k], key=key, prompt=True) if k else ""
            start = self._prefix(key, prompt, whole, texts, ids, offsets, image_ids)
            if not self.generation:
                end = self.render(messages[: k + 1], key=key)
                replies.append((start, self._prefix(key, end, whole, texts, ids, offsets, image_ids)))

        def target(i: int) -> bool:
            s, e = offsets[i]
            if self.generation:  # a token touching a span, as transformers marks them
                return any(s < hi and e > lo for lo, hi in gen_spans)
            return any(lo <= i < hi for lo, hi in replies)

        return Encoded(ids, [target(i) for i in range(len(ids))])

    def _prefix(
        self,
        key: str,
        text: str,
        whole: str,
        texts: list[tuple[int, int]],
        ids: list[int],
        offsets: list[tuple[int, int]],
        image_ids: Callable[[int], list[int]],
    ) -> int:
        """How many of the whole rendering's tokens the rendering ``text`` of the conversation's start is; a
        :class:`TemplateMismatch` naming the first differing token when its tokens are not the first ones."""
        if not text:
            return 0
        if not whole.startswith(text):
            d = next((i for i, (a, b) in enumerate(zip(text, whole)) if a != b), min(len(text), len(whole)))
            at = next((i for i, (_, end) in enumerate(offsets) if end > d), len(offsets))
            raise TemplateMismatch(
                f"sample {key}: the rendering up to a reply differs from the whole conversation's at token "
                f"{at} (character {d}): {text[d : d + 40]!r} against {whole[d : d + 40]!r}"
            )
        clipped = [(lo, min(hi, len(text))) for lo, hi in texts if lo < len(text)]
        part, _ = self._tokenize(text, clipped, image_ids)
        if part != ids[: len(part)]:
            at = next((i for i, (a, b) in enumerate(zip(part, ids)) if a != b), len(part))
            raise TemplateMismatch(
                f"sample {key}: the tokens of the rendering up to a reply differ from the whole "
                f"conversation's at token {at} ({part[at : at + 5]} against {ids[at : at + 5]})"
            )
        return len(part)

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
        self, text: str, texts: list[tuple[int, int]], image_ids: Callable[[int], list[int]]
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character spans of ``text``: each image token as the image's ids, the rest tokenized as
        the whole string is (as ``apply_chat_template`` does, and a processor, which repeats the image token
        in the text), except where that would parse a special token inside the messages' text (``texts``):
        there the text between image tokens is tokenized apart, the messages' text as text and the
        template's apart."""
        whole = self._whole(text, texts, image_ids)
        if whole is not None:
            return whole
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pos = 0
        for k, part in enumerate(re.split(re.escape(self.image_token), text)):
            if k:
                new = image_ids(k - 1)
                ids += new
                offsets += [(pos, pos + len(self.image_token))] * len(new)
                pos += len(self.image_token)
            inside = [(max(lo, pos) - pos, min(hi, pos + len(part)) - pos) for lo, hi in texts]
            inside = [(lo, hi) for lo, hi in inside if lo < hi]
            run_ids, run_offsets = self._encode(part, False)
            if any(
                i in self.special_ids and any(lo < e and s < hi for lo, hi in inside)
                for i, (s, e) in zip(run_ids, run_offsets)
            ):
                run_ids, run_offsets = self._segments(part, inside)
            ids += run_ids
            offsets += [(pos + s, pos + e) for s, e in run_offsets]
            pos += len(part)
        return ids, offsets

    def _whole(
        self, text: str, texts: list[tuple[int, int]], image_ids: Callable[[int], list[int]]
    ) -> tuple[list[int], list[tuple[int, int]]] | None:
        """``text`` tokenized in one piece (:func:`~connectors.chat_template.encode_rendering`: a tokenizer
        that marks the start of a string, as SentencePiece's does, marks it once), each image token's id
        replaced by the image's ids; None when a special token other than the image token is parsed inside
        the messages' text, or the image token does not come out as one id each time."""
        run_ids, run_offsets = encode_rendering(self.tokenizer, text, self.bos_added)
        image = self.image_token_id
        if run_ids.count(image) != text.count(self.image_token):
            return None
        if any(
            i != image and i in self.special_ids and any(lo < e and s < hi for lo, hi in texts)
            for i, (s, e) in zip(run_ids, run_offsets)
        ):
            return None
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        k = 0
        for i, span in zip(run_ids, run_offsets):
            new = [i]
            if i == image:
                new, k = image_ids(k), k + 1
            ids += new
            offsets += [span] * len(new)
        return ids, offsets

    def _segments(self, text: str, inside: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """``text`` with the messages' text (``inside``) tokenized as text, the template's text apart."""
        cuts = sorted({0, len(text), *(x for span in inside for x in span)})
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        for lo, hi in zip(cuts, cuts[1:]):
            as_text = any(s <= lo and hi <= e for s, e in inside)
            run_ids, run_offsets = self._encode(text[lo:hi], as_text)
            ids += run_ids
            offsets += [(lo + s, lo + e) for s, e in run_offsets]
        return ids, offsets

    def _encode(self, text: str, as_text: bool) -> tuple[list[int], list[tuple[int, int]]]:
        if not text:
            return [], []
        enc = self.tokenizer(
            text, add_special_tokens=False, split_special_tokens=as_text, return_offsets_mapping=True
        )
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
