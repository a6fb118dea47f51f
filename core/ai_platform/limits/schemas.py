"""Request and response structs of the limit routes: ``/limits``, ``/limits/usage``, ``/quotas``, ``/usage/keys``."""

from __future__ import annotations

from typing import Annotated

import msgspec


class LimitEntry(msgspec.Struct, kw_only=True):
    operation: str
    daily_limit: int
    max_input_chars: int
    max_output_tokens: int | None  # None: the operation only chooses among options (it generates nothing)
    max_input_tokens: int | None  # the prompt, in the model's tokens; None: the model's context window


class LimitsResponse(msgspec.Struct, kw_only=True):
    limits: list[LimitEntry]


class LimitUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``PUT /limits`` body. A daily limit of 0 stops an operation until raised again."""

    operation: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    daily_limit: Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)]


class UsageEntry(msgspec.Struct, kw_only=True):
    operation: str
    date: str
    request_count: int
    total_tokens: int
    daily_limit: int
    remaining: int


class UsageResponse(msgspec.Struct, kw_only=True):
    usage: list[UsageEntry]
    generated_at: str


KEY_ID_PATTERN = r"^[0-9a-f]{16}$"  # what auth.key_id makes: 16 lowercase hex digits
KeyId = Annotated[str, msgspec.Meta(min_length=16, max_length=16, pattern=KEY_ID_PATTERN)]


class QuotaEntry(msgspec.Struct, kw_only=True):
    key_id: str
    operation: str
    daily_limit: int


class QuotaUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``PUT /quotas`` body: the daily limit of one key on one operation (0 stops it)."""

    key_id: KeyId
    operation: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    daily_limit: Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000)]


class QuotasResponse(msgspec.Struct, kw_only=True):
    quotas: list[QuotaEntry]


class KeyUsageEntry(msgspec.Struct, kw_only=True):
    key_id: str
    operation: str
    date: str
    request_count: int
    total_tokens: int
    daily_limit: int | None  # the key's quota; null when only the operation's limit applies
    remaining: int | None


class KeyUsageResponse(msgspec.Struct, kw_only=True):
    usage: list[KeyUsageEntry]
    generated_at: str
