"""Limits and quotas, in one place: each operation's daily limit, each API key's daily quota, and the usage
counted against them.

- ``routes.py``: every ``/limits``, ``/limits/usage``, ``/quotas`` and ``/usage/keys`` route;
- ``schemas.py``: their request and response structs;
- ``service.py``: :class:`~ai_platform.limits.service.LimitService`, the only way in: the orchestrator
  admits and settles requests through it, the routes read and change limits through it;
- ``statements.py``: the per-request admission and settlement transactions, as plain SQL.

What an operation declares (``daily_limit``, input and output caps) is the plugin API's
:class:`ai_platform.operations.Limits`. The limit tables' Tortoise models (``DailyUsage``,
``OperationLimit``, ``KeyQuota``, ``KeyDailyUsage``, ``Reservation``) stay in
``ai_platform.usage.models``: Tortoise loads one models module per app, and the migrations
(``ai_platform.usage.migrations``) are written against it. The database itself (opening,
migrating, the transaction runners, health) is ``ai_platform.usage``'s.
"""
