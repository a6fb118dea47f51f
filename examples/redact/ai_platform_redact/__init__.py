"""Redaction: e-mail addresses and phone numbers never reach the model, nor leave in generated text.

A cross-cutting plugin: it adds no operation, it wraps every operation's
``build_model_call`` and ``build_response`` hooks (pluggy ``wrapper=True``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Generator
from typing import Any

import msgspec

from ai_platform import Choice, Choose, Completion, Generate, Message, Operation, ResponseMeta, hookimpl

PLUGIN_API_VERSION = 1

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# International or local numbers with at least 7 digits, allowing spaces, dots, dashes and brackets.
PHONE = re.compile(r"(?<![\w.])\+?\d[\d ().-]{5,}\d(?!\w)")


def redact(text: str) -> str:
    """Replace e-mail addresses with ``[email]`` and phone numbers with ``[phone]``."""
    text = EMAIL.sub("[email]", text)
    return PHONE.sub(lambda m: "[phone]" if sum(c.isdigit() for c in m.group()) >= 7 else m.group(), text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, ResponseMeta):
        return value  # the platform's own bookkeeping: nothing personal in it
    if isinstance(value, msgspec.Struct):
        changes = {f: _redact_value(getattr(value, f)) for f in value.__struct_fields__}
        return msgspec.structs.replace(value, **changes)
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    return value


@hookimpl(wrapper=True)
def build_model_call(operation: Operation, request: Any) -> Generator[None, Generate | Choose, Generate | Choose]:
    call = yield
    # A Choose call's options are left alone: they are the caller's own labels, and the
    # response must name them exactly.
    return dataclasses.replace(call, messages=[Message(m.role, redact(m.content)) for m in call.messages])


@hookimpl(wrapper=True)
def build_response(
    operation: Operation, request: Any, result: Completion | Choice, meta: ResponseMeta
) -> Generator[None, msgspec.Struct, msgspec.Struct]:
    response = yield
    if isinstance(result, Choice):
        return response  # a choice among the caller's own labels: nothing the model wrote
    redacted: msgspec.Struct = _redact_value(response)
    return redacted
