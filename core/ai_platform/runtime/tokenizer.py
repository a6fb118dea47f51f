"""Tokenizer and chat template of a model folder, without transformers.

The chat template is rendered the way ``transformers``' ``apply_chat_template``
does it (same Jinja environment, globals and variables), so a model answers
prompts formatted exactly as it was trained on.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from ai_platform.operations import Message

# The special-token attributes transformers passes to every chat template.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
)


@functools.cache
def _byte_level_bytes() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's ``bytes_to_unicode``), reversed: a token string's character to its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(char): byte for byte, char in zip(printable, chars, strict=True)}


BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece's byte tokens


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a Hugging Face chat template in transformers' sandboxed environment."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _token_content(value: Any) -> Any:
    """Special tokens are stored as strings or as serialized ``AddedToken`` dicts."""
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, list):
        return [_token_content(item) for item in value]
    return value


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _read_chat_template(folder: Path, tokenizer_config: Mapping[str, Any]) -> str:
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template:
        raise ValueError("no chat template: neither chat_template.jinja nor tokenizer_config.json 'chat_template'")
    return template


class ChatTokenizer:
    """Renders chat messages with the model's template and maps text to token ids and back."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str, special_tokens: Mapping[str, Any]) -> None:
        self._tokenizer = tokenizer
        self._template = compile_chat_template(chat_template)
        self._special_tokens = {name: value for name, value in special_tokens.items() if value}
        self._pieces: dict[int, tuple[str, bytes]] = {}  # token id -> (text, raw bytes), filled as asked

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTokenizer:
        """Load ``tokenizer.json``, its special tokens and the chat template from a model folder."""
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        token_map = _read_json(folder / "special_tokens_map.json")
        special = {name: _token_content(config.get(name, token_map.get(name))) for name in SPECIAL_TOKEN_NAMES}
        return cls(tokenizer, _read_chat_template(folder, config), special)

    @property
    def eos_token_id(self) -> int | None:
        """Id of the tokenizer's eos token (for chat models: the end-of-turn token)."""
        eos = self._special_tokens.get("eos_token")
        return self._tokenizer.token_to_id(eos) if isinstance(eos, str) else None

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt text for ``messages``, ending with the assistant's generation prompt."""
        return self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            tools=None,
            documents=None,
            add_generation_prompt=True,
            **self._special_tokens,
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it are matched, none are added."""
        # The rendered template already contains every special token the model expects
        # (e.g. a BOS); letting the post-processor add more would double them.
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without special tokens."""
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def decode_stream(self) -> Callable[[int], str | None]:
        """A decoder of one growing sequence, a token at a time: the text each token completes, or None
        while it ends inside a character (special tokens left out, as :meth:`decode`).

        tokenizers' own ``DecodeStream``: it decodes only the last few tokens each step, where
        decoding the whole sequence again per token grows with its length (1.4 ms a token at
        4,096 tokens on the demo tokenizer, against a 15-25 ms decode step).
        """
        stream = DecodeStream(skip_special_tokens=True)
        tokenizer = self._tokenizer
        return lambda token: stream.step(tokenizer, token)

    def piece(self, token: int) -> tuple[str, bytes]:
        """One token alone: its text (U+FFFD for part of a character; a special token as written) and raw bytes."""
        cached = self._pieces.get(token)
        if cached is None:
            text = self._tokenizer.decode([token], skip_special_tokens=False)
            cached = self._pieces[token] = (text, self._raw_bytes(token, text))
        return cached

    def _raw_bytes(self, token: int, text: str) -> bytes:
        raw = self._tokenizer.id_to_token(token)
        if raw is None or token in self._tokenizer.get_added_tokens_decoder():
            return text.encode()
        if type(self._tokenizer.decoder).__name__ == "ByteLevel":
            alphabet = _byte_level_bytes()
            if all(char in alphabet for char in raw):
                return bytes(alphabet[char] for char in raw)
        if byte := BYTE_FALLBACK.match(raw):
            return bytes([int(byte[1], 16)])
        return text.encode()


class TextDeltas:
    """The new text of a sequence growing a token at a time, as a streaming client should see it.

    Byte-level BPE splits characters across tokens, so a token alone may be half a character:
    a delta waits while the text ends in an incomplete character. Leading whitespace is dropped,
    as :meth:`PromptEncoder.completion` strips it. Joined, the deltas are the sequence's
    :meth:`ChatTokenizer.decode` without its leading whitespace; each step decodes only the
    last few tokens (:meth:`ChatTokenizer.decode_stream`).
    """

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self._step = tokenizer.decode_stream()
        self._started = False  # some text other than whitespace was sent

    def push(self, token: int) -> str:
        """The text that ``token`` completes ("" while it is not known yet)."""
        delta = self._step(token) or ""
        if not self._started:
            delta = delta.lstrip()
            self._started = bool(delta)
        return delta
