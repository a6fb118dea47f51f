"""Several servers and workers on one database: limits are exact, never multiplied by replicas.

The bugs this guards against (LiteLLM proxy #27736, #40291, #34732, #40095):
limits kept per process, and check-then-increment races under concurrency.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest

from support import ADMIN, ADMIN_KEY, CLASSIFY, CLIENT_KEY, SUMMARIZE, TRANSLATE

pytestmark = pytest.mark.slow

OTHER_KEY = "test-other-client-key-0123456789"
PER_SERVER = 100
LIMIT = 37  # the operation's daily limit
QUOTA = 15  # one key's quota on another operation


async def _burst(base_urls: list[str], path: str, body: dict[str, object], key: str) -> list[httpx.Response]:
    async def one(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(path, json=body, headers={"X-API-Key": key})

    clients = [
        httpx.AsyncClient(base_url=u, timeout=120, limits=httpx.Limits(max_connections=PER_SERVER)) for u in base_urls
    ]
    try:
        return await asyncio.gather(*(one(c) for c in clients for _ in range(PER_SERVER)))
    finally:
        for c in clients:
            await c.aclose()


def test_limits_are_exact_across_servers_and_workers(serve: object, database_url: str) -> None:
    """3 processes (a 2-worker server and a 1-worker server), 2 x 100 concurrent requests on each of 3 operations."""
    keys = {"VALID_API_KEYS": f'["{CLIENT_KEY}", "{OTHER_KEY}"]', "FAKE_DELAY": "0.05"}
    first = serve(database_url, workers=2, **keys)  # type: ignore[operator]
    second = serve(database_url, workers=1, **keys)  # type: ignore[operator]
    with httpx.Client(base_url=first.base_url, headers=ADMIN, timeout=30) as admin:
        assert admin.put("/limits", json={"operation": "summarize", "daily_limit": LIMIT}).status_code == 200
        other_id = httpx.get(f"{second.base_url}/usage/keys/me", headers={"X-API-Key": OTHER_KEY}).json()["usage"][0][
            "key_id"
        ]
        r = admin.put("/quotas", json={"key_id": other_id, "operation": "translate", "daily_limit": QUOTA})
        assert r.status_code == 200, r.text

    async def at_once() -> list[list[httpx.Response]]:
        urls = [first.base_url, second.base_url]
        return await asyncio.gather(
            _burst(urls, "/operations/summarize", SUMMARIZE, CLIENT_KEY),  # against the operation's limit
            _burst(urls, "/operations/translate", TRANSLATE, OTHER_KEY),  # against one key's quota
            _burst(urls, "/operations/classify", CLASSIFY, CLIENT_KEY),  # far below its limit
        )

    summarized, translated, classified = asyncio.run(at_once())
    # No false rejections under load (LiteLLM #36926): a burst of first requests of the day all pass.
    assert [r.status_code for r in classified] == [200] * 2 * PER_SERVER
    for responses, limit in ((summarized, LIMIT), (translated, QUOTA)):
        assert Counter(r.status_code for r in responses) == {200: limit, 429: 2 * PER_SERVER - limit}
        # Each admission saw its own count: the remaining values are exactly limit-1 … 0, none repeated.
        remaining = sorted(int(r.headers["X-RateLimit-Remaining"]) for r in responses if r.status_code == 200)
        assert remaining == list(range(limit))
        refused = [r for r in responses if r.status_code == 429]
        assert all(r.headers["X-RateLimit-Remaining"] == "0" and int(r.headers["Retry-After"]) > 0 for r in refused)
        assert all(r.headers["X-RateLimit-Limit"] == str(limit) for r in responses)

    with httpx.Client(base_url=second.base_url, headers=ADMIN, timeout=30) as admin:
        usage = {u["operation"]: u for u in admin.get("/limits/usage").json()["usage"]}
        assert (usage["summarize"]["request_count"], usage["summarize"]["remaining"]) == (LIMIT, 0)
        assert usage["translate"]["request_count"] == QUOTA
        assert usage["classify"]["request_count"] == 2 * PER_SERVER
        assert usage["summarize"]["total_tokens"] == sum(
            r.json()["meta"]["output_tokens"] for r in summarized if r.status_code == 200
        )
        per_key = {(u["key_id"], u["operation"]): u for u in admin.get("/usage/keys").json()["usage"]}
        assert per_key[other_id, "translate"]["request_count"] == QUOTA
        assert per_key[other_id, "translate"]["remaining"] == 0
        client_id = next(k for k, op in per_key if k != other_id and per_key[k, op]["request_count"] == LIMIT)
        assert per_key[client_id, "summarize"]["daily_limit"] is None
        assert ADMIN_KEY not in str(per_key)
