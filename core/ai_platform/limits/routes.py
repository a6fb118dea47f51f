"""The limit routes: ``/limits`` and ``/limits/usage`` (the operations' daily limits), ``/quotas`` (admin: per-key
quotas) and ``/usage/keys`` (admin; ``/me`` for any key: per-key usage).

Keys are named by their key id (a keyed hash, as in the audit trail), never
by the key itself; a caller learns its own id from ``GET /usage/keys/me``.
Every handler reaches the database through :class:`LimitService` alone.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from litestar import Request, delete, get, put
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath, FromQuery, JSONBody

from ai_platform.api.auth import KeyRing, Principal, admin_only
from ai_platform.api.openapi_responses import documented
from ai_platform.api.validation import not_one_of, shorten
from ai_platform.errors import NotFoundError, RequestValidationError
from ai_platform.limits.schemas import (
    KEY_ID_PATTERN,
    KeyId,
    KeyUsageEntry,
    KeyUsageResponse,
    LimitEntry,
    LimitsResponse,
    LimitUpdate,
    QuotaEntry,
    QuotasResponse,
    QuotaUpdate,
    UsageEntry,
    UsageResponse,
)
from ai_platform.limits.service import KeyUsageInfo, LimitInfo, LimitService, QuotaInfo
from ai_platform.timestamps import iso_timestamp


def _limit_entry(info: LimitInfo) -> LimitEntry:
    return LimitEntry(
        operation=info.operation,
        daily_limit=info.daily_limit,
        max_input_chars=info.max_input_chars,
        max_output_tokens=info.max_output_tokens,
        max_input_tokens=info.max_input_tokens,
    )


def limit_routes(limits: LimitService) -> list[HTTPRouteHandler]:
    @get("/limits", tags=["limits"], summary="Limits of every operation.", **documented(403, 500, 503))
    async def get_limits() -> LimitsResponse:
        return LimitsResponse(limits=[_limit_entry(i) for i in await limits.limits()])

    @put(
        "/limits",
        tags=["limits"],
        summary="Change an operation's daily limit (admin key).",
        guards=[admin_only],
        opt={"body_type": LimitUpdate},
        **documented(403, 413, 415, 422, 500, 503),
    )
    async def put_limits(data: JSONBody[LimitUpdate]) -> LimitEntry:
        if data.operation not in limits.operations:
            raise not_one_of("operation", limits.operations, data.operation)
        return _limit_entry(await limits.set_daily_limit(data.operation, data.daily_limit))

    @get("/limits/usage", tags=["limits"], summary="Today's usage of every operation.", **documented(403, 500, 503))
    async def get_usage() -> UsageResponse:
        rows = await limits.usage()
        return UsageResponse(
            usage=[
                UsageEntry(
                    operation=r.operation,
                    date=r.date.isoformat(),
                    request_count=r.request_count,
                    total_tokens=r.total_tokens,
                    daily_limit=r.daily_limit,
                    remaining=r.remaining,
                )
                for r in rows
            ],
            generated_at=iso_timestamp(datetime.now(UTC)),
        )

    return [get_limits, put_limits, get_usage]


def _quota_entry(info: QuotaInfo) -> QuotaEntry:
    return QuotaEntry(key_id=info.key_id, operation=info.operation, daily_limit=info.daily_limit)


def _usage_response(rows: list[KeyUsageInfo]) -> KeyUsageResponse:
    return KeyUsageResponse(
        usage=[
            KeyUsageEntry(
                key_id=r.key_id,
                operation=r.operation,
                date=r.date.isoformat(),
                request_count=r.request_count,
                total_tokens=r.total_tokens,
                daily_limit=r.daily_limit,
                remaining=r.remaining,
            )
            for r in rows
        ],
        generated_at=iso_timestamp(datetime.now(UTC)),
    )


def quota_routes(limits: LimitService, keyring: KeyRing) -> list[HTTPRouteHandler]:
    # Only configured keys can be given quotas: a typo must not silently set nothing.
    key_ids = keyring.key_ids

    @get(
        "/quotas",
        tags=["quotas"],
        summary="Every per-key quota (admin key).",
        guards=[admin_only],
        **documented(403, 500, 503),
    )
    async def get_quotas() -> QuotasResponse:
        return QuotasResponse(quotas=[_quota_entry(q) for q in await limits.quotas()])

    @put(
        "/quotas",
        tags=["quotas"],
        summary="Set one key's daily limit on one operation (admin key).",
        guards=[admin_only],
        opt={"body_type": QuotaUpdate},
        **documented(403, 413, 415, 422, 500, 503),
    )
    async def put_quota(data: JSONBody[QuotaUpdate]) -> QuotaEntry:
        if data.key_id not in key_ids:
            raise not_one_of("key_id", ["the key id of a configured key (see GET /usage/keys)"], data.key_id)
        if data.operation not in limits.operations:
            raise not_one_of("operation", limits.operations, data.operation)
        return _quota_entry(await limits.set_quota(data.key_id, data.operation, data.daily_limit))

    @delete(
        "/quotas/{key_id:str}/{operation:str}",
        tags=["quotas"],
        summary="Remove one key's quota on one operation (admin key).",
        guards=[admin_only],
        **documented(403, (404, "No such quota."), 500, 503),
    )
    async def delete_quota(key_id: FromPath[str], operation: FromPath[str]) -> None:
        # Checked before the database sees them: path parameters are arbitrary client text.
        known = key_id in key_ids and operation in limits.operations
        if not known or not await limits.delete_quota(key_id, operation):
            raise NotFoundError("No such quota.")

    @get(
        "/usage/keys",
        tags=["quotas"],
        summary="Today's usage of every key, or of one (admin key).",
        guards=[admin_only],
        **documented(403, (404, "No configured key has this id."), (422, "`key_id` is not 16 lowercase hex digits."),
                     500, 503),
    )  # fmt: skip
    async def get_key_usage(key_id: FromQuery[KeyId | None] = None) -> KeyUsageResponse:
        # Litestar does not apply KeyId's constraints to an optional query parameter: checked here.
        if key_id is not None and not re.fullmatch(KEY_ID_PATTERN, key_id):
            raise RequestValidationError(
                [{"type": "string_pattern_mismatch", "loc": ["query", "key_id"],
                  "msg": f"String should match pattern '{KEY_ID_PATTERN}'", "input": shorten(key_id, 100)}]
            )  # fmt: skip
        if key_id is not None and key_id not in key_ids:
            raise NotFoundError(f"No configured key has the id '{key_id}'.")
        return _usage_response(await limits.key_usage([key_id] if key_id else key_ids))

    @get(
        "/usage/keys/me",
        tags=["quotas"],
        summary="Today's usage of the calling key, and its key id.",
        **documented(403, 500, 503),
    )
    async def get_my_usage(request: Request[Principal, Any, Any]) -> KeyUsageResponse:
        return _usage_response(await limits.key_usage([request.user.key_id]))

    return [get_quotas, put_quota, delete_quota, get_key_usage, get_my_usage]
