"""Request body decoding with the seed's 422 error format.

msgspec validates; this module turns its messages into pydantic-style error
entries (``type``/``loc``/``msg``/``input``) that clients of the original
FastAPI service already parse.

A body must be JSON: a ``Content-Type`` other than ``application/json`` (a
``charset`` other than UTF-8, a form, text) is refused with 415, and so is a
request with two ``Content-Type`` headers. A body without ``Content-Type`` is
read as JSON, as the seed did. JSON objects with a repeated key are refused
with 422 ``json_invalid`` instead of keeping one of the values silently.
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
from litestar import Request

from ai_platform.errors import PlatformError, RequestValidationError

_PATH = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[\.\.\.\]")
_TYPE_NAMES = {
    "str": ("string_type", "Input should be a valid string"),
    "int": ("int_type", "Input should be a valid integer"),
    "float": ("float_type", "Input should be a valid number"),
    "bool": ("bool_type", "Input should be a valid boolean"),
    "array": ("list_type", "Input should be a valid list"),
    "object": ("dict_type", "Input should be a valid dictionary"),
    "null": ("none_required", "Input should be None"),
}
_RULES: list[tuple[re.Pattern[str], Any]] = [
    (re.compile(r"Object missing required field `(?P<f>[^`]+)`"), "missing"),
    (re.compile(r"Object contains unknown field `(?P<f>[^`]+)`"), "extra"),
    (re.compile(r"Expected `str` of length <= (?P<n>\d+)"), ("string_too_long", "String should have at most {n} character{s}")),
    (re.compile(r"Expected `str` of length >= (?P<n>\d+)"), ("string_too_short", "String should have at least {n} character{s}")),
    (re.compile(r"Expected `array` of length <= (?P<n>\d+)"), ("too_long", "List should have at most {n} item{s} after validation")),
    (re.compile(r"Expected `array` of length >= (?P<n>\d+)"), ("too_short", "List should have at least {n} item{s} after validation")),
    (re.compile(r"Expected `str` matching regex '(?P<p>.*)'"), ("string_pattern_mismatch", "String should match pattern '{p}'")),
    (re.compile(r"Expected `(int|float)` >= (?P<n>[-\d.]+)"), ("greater_than_equal", "Input should be greater than or equal to {n}")),
    (re.compile(r"Expected `(int|float)` > (?P<n>[-\d.]+)"), ("greater_than", "Input should be greater than {n}")),
    (re.compile(r"Expected `(int|float)` <= (?P<n>[-\d.]+)"), ("less_than_equal", "Input should be less than or equal to {n}")),
    (re.compile(r"Expected `(int|float)` < (?P<n>[-\d.]+)"), ("less_than", "Input should be less than {n}")),
    (re.compile(r"Expected `(?P<t>\w+)(?: \| null)?`, got `\w+`"), "type"),
]  # fmt: skip


JSON_MEDIA_TYPE = "application/json"


class UnsupportedMediaTypeError(PlatformError):
    """A body that is not sent as JSON."""

    status_code = 415


async def validate_body(request: Request[Any, Any, Any]) -> None:
    """``before_request`` hook: validate the body against the handler's ``opt["body_type"]``.

    It runs before Litestar decodes ``data`` so that every invalid body is
    reported in the seed's format, malformed JSON included.
    """
    body_type = request.route_handler.opt.get("body_type")
    if body_type is not None:
        check_media_type(request.headers.getall("content-type", []))
        decode_body(await request.body(), body_type)


def check_media_type(content_types: list[str]) -> None:
    """Raise :class:`UnsupportedMediaTypeError` unless the body is JSON (or says nothing of its type)."""
    if not content_types:
        return  # no Content-Type: read as JSON, as the seed (FastAPI) did
    if len(content_types) > 1:
        raise UnsupportedMediaTypeError(f"One Content-Type, please: send the body as {JSON_MEDIA_TYPE}.")
    media_type, *parameters = content_types[0].split(";")
    media_type = media_type.strip().lower()
    charset = "utf-8"
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    if media_type != JSON_MEDIA_TYPE or charset not in ("utf-8", "utf8"):
        shown = shorten(content_types[0].strip(), 64) or "(empty)"
        raise UnsupportedMediaTypeError(
            f"Unsupported media type '{shown}': send the body as {JSON_MEDIA_TYPE} (UTF-8)."
        )


def shorten(text: str, limit: int = 100) -> str:
    """``text`` safe to echo back: at most ``limit`` characters (then ``…``), control characters escaped."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text[:limit])
    return shown + ("…" if len(text) > limit else "")


def not_one_of(field: str, allowed: list[str], value: str) -> RequestValidationError:
    """A 422 for a body field whose value is not among ``allowed`` (pydantic's ``enum`` error)."""
    return RequestValidationError(
        [
            {
                "type": "enum",
                "loc": ["body", field],
                "msg": f"Input should be one of: {', '.join(allowed)}",
                "input": value,
            }
        ]
    )


def decode_body(body: bytes, target: type[Any]) -> Any:
    """Decode and validate a JSON body into ``target`` or raise :class:`RequestValidationError`."""
    try:
        value = msgspec.json.decode(body, type=target)
    except msgspec.ValidationError as exc:
        raise RequestValidationError([_entry(str(exc), body)]) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ["body"], "msg": f"Invalid JSON: {exc}", "input": None}]
        ) from None
    repeated = _repeated_key(body)
    if repeated is not None:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": repeated, "msg": f"Invalid JSON: duplicate key '{repeated[-1]}'",
              "input": None}]
        )  # fmt: skip
    return value


class _Repeated:
    """Stands, in the parsed document, for a JSON object in which ``key`` occurs more than once."""

    def __init__(self, key: str) -> None:
        self.key = key


def _object_or_repeated(pairs: list[tuple[str, Any]]) -> dict[str, Any] | _Repeated:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            return _Repeated(key)
        result[key] = value
    return result


def _repeated_key(body: bytes) -> list[str | int] | None:
    """``loc`` of the first key repeated in one of the body's JSON objects, or None.

    msgspec keeps the last value of a repeated key without a word; the standard
    library's parser shows every pair. Only bodies msgspec accepted get here.
    """
    if b'"' not in body:
        return None
    try:
        document = json.loads(body, object_pairs_hook=_object_or_repeated)
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[Any, list[str | int]]] = [(document, ["body"])]
    while stack:  # depth first, in document order
        value, loc = stack.pop()
        if isinstance(value, _Repeated):
            return [*loc, value.key]
        if isinstance(value, dict):
            stack.extend((v, [*loc, k]) for k, v in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((v, [*loc, i]) for i, v in reversed(list(enumerate(value))))
    return None


def _entry(message: str, body: bytes) -> dict[str, Any]:
    text, _, path = message.partition(" - at `$")
    loc: list[str | int] = ["body"]
    for name, index in _PATH.findall(path.rstrip("`")):
        loc.append(name if name else int(index))
    for pattern, kind in _RULES:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        groups = match.groupdict()
        if kind == "missing":
            return {"type": "missing", "loc": [*loc, groups["f"]], "msg": "Field required", "input": None}
        if kind == "extra":
            field_loc = [*loc, groups["f"]]
            return {
                "type": "extra_forbidden",
                "loc": field_loc,
                "msg": "Extra inputs are not permitted",
                "input": _value_at(body, field_loc),
            }
        if kind == "type":
            type_name, msg = _TYPE_NAMES.get(groups["t"], ("type_error", f"Input should be a valid {groups['t']}"))
            return {"type": type_name, "loc": loc, "msg": msg, "input": _value_at(body, loc)}
        type_name, template = kind
        n = groups.get("n", "")
        msg = template.format(n=n, p=groups.get("p", ""), s="" if n == "1" else "s")
        return {"type": type_name, "loc": loc, "msg": msg, "input": _value_at(body, loc)}
    # Errors raised by a schema's own checks (``__post_init__``) carry no path.
    return {"type": "value_error", "loc": loc, "msg": f"Value error, {text}", "input": _value_at(body, loc)}


def _value_at(body: bytes, loc: list[str | int]) -> Any:
    """The offending value, shortened so a huge input is not echoed back in full."""
    try:
        value: Any = msgspec.json.decode(body)
        for part in loc[1:]:
            value = value[part]
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, KeyError, IndexError, TypeError):
        return None
    if isinstance(value, str) and len(value) > 100:
        return value[:100] + "…"
    if isinstance(value, dict | list) and len(msgspec.json.encode(value)) > 200:
        return "…"
    return value
