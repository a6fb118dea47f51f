"""Database lifecycle: Tortoise ORM init/close, schema migrations, failure translation.

SQLite (one host) and PostgreSQL (several servers) are both supported through
``DATABASE_URL``. The schema is managed by Tortoise's built-in migrations
(``ai_platform.usage.migrations``), applied at startup under a lock so that
several workers or servers starting together migrate exactly once.

One :class:`Database` object per app holds everything this process knows of its
database: the URL, where the per-request transactions run while it is open, and
its health. ``create_app`` makes it (``PlatformPlugin``) and hands it to the limit
service, the audit trail and ``/health``; nothing here is module-level state, so
two apps in one process share nothing but what Tortoise itself keeps (see
:meth:`Database._open`).

The server does not need the database to start: :meth:`Database.open_in_background`
keeps trying to open it (with backoff, each failure logged) while the app already
serves, every call that needs it answering 503 until it opens, and ``/health``
saying why (:meth:`Database.status`).
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import math
import os
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Concatenate, ParamSpec, Protocol, TypeVar

import asyncpg
from tortoise import Tortoise
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.backends.base.config_generator import expand_db_url
from tortoise.context import TortoiseContext
from tortoise.exceptions import BaseORMException, DBConnectionError
from tortoise.migrations.executor import MigrationExecutor, MigrationTarget
from tortoise.migrations.recorder import MigrationRecorder

from ai_platform.errors import DatabaseUnavailableError
from ai_platform.usage.statements import Runner, runner_for

log = logging.getLogger(__name__)

MODELS_MODULE = "ai_platform.usage.models"
MIGRATIONS_MODULE = "ai_platform.usage.migrations"
APPS = {"models": {"models": [MODELS_MODULE], "migrations": MIGRATIONS_MODULE, "default_connection": "default"}}
# The schema that ``generate_schemas`` created before migrations existed.
BASELINE = MigrationTarget(app_label="models", name="0001_initial")
# Any stable 64-bit number: the PostgreSQL advisory lock that serialises migrations.
PG_MIGRATION_LOCK = 0x41_49_50_4C_41_54  # "AIPLAT"
# Writers wait for each other this long before SQLite reports "database is locked".
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Opening the database at startup: the wait before the second attempt, doubled after each failure up to
# the last value; and how long one attempt may take to connect (migrating is not bounded: another
# worker may hold the migration lock).
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 10.0
# /health checks a database that failed a request again at most this often.
PROBE_SECONDS = 5.0
UNAVAILABLE = "The usage database is unavailable; try again shortly."

DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    BaseORMException,
    OSError,
    TimeoutError,
    sqlite3.Error,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)

# SQLite's messages when the file is busy, unreadable or full (others, like "no such table", are bugs).
SQLITE_OUTAGES = ("locked", "busy", "unable to open", "disk", "readonly", "not a database")

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class _Health:
    """What this process knows of the database, for ``/health`` and ``Retry-After``."""

    error: str | None = None  # the last failure: of opening it, or of a request since (an outage)
    next_attempt: float | None = None  # time.monotonic() of the next attempt to open it; None: not waiting
    checked: float = 0.0  # time.monotonic() of the last probe after a request's failure
    # The last failed write of the audit trail, until one succeeds: a database that answers
    # SELECT 1 may still refuse writes (read-only file, full disk), and the probe cannot tell.
    write_error: str | None = None


@dataclass(frozen=True)
class DatabaseStatus:
    available: bool
    error: str | None  # why not (the exception's type and message)
    next_attempt_seconds: float | None  # while it is not open yet: when the next attempt to open it runs


def describe(exc: BaseException) -> str:
    """``ExceptionType: message`` of the driver's error behind ``exc`` (which Tortoise may wrap)."""
    cause = exc.__cause__ or exc.__context__ or exc
    text = str(cause) or str(exc)
    return f"{type(cause).__name__}: {text}"[:300] if text else type(cause).__name__


class UsesDatabase(Protocol):
    """An object whose methods :func:`translate_errors` guards: it names the database they use."""

    @property
    def database(self) -> Database: ...


S = TypeVar("S", bound=UsesDatabase)


def translate_errors(method: Callable[Concatenate[S, P], Awaitable[R]]) -> Callable[Concatenate[S, P], Awaitable[R]]:
    """Turn a failing database into :class:`DatabaseUnavailableError` (503), never a crash or a bare 500.

    Also while the database is not open yet (the server starts without it): 503 at once.
    For methods of an object whose ``database`` is the :class:`Database` they use.
    """

    @functools.wraps(method)
    async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        database = self.database
        if not database.is_open():
            raise database.not_open()
        try:
            result = await method(self, *args, **kwargs)
        except DatabaseUnavailableError:
            raise
        except DATABASE_ERRORS as exc:
            if not is_outage(exc):
                raise
            database.health.error = describe(exc)
            raise DatabaseUnavailableError(UNAVAILABLE) from exc
        database.health.error = None
        return result

    return wrapper


def is_outage(exc: BaseException) -> bool:
    """Whether a database error means unreachable, busy or out of space, rather than a bug (stays a 500)."""
    cause = exc.__cause__ or exc.__context__ or exc  # Tortoise wraps driver errors, not always with "from"
    if isinstance(cause, asyncpg.SyntaxOrAccessError | asyncpg.DataError | asyncpg.IntegrityConstraintViolationError):
        return False
    if isinstance(cause, sqlite3.Error):
        return any(word in str(cause).lower() for word in SQLITE_OUTAGES)
    return isinstance(
        cause, OSError | TimeoutError | DBConnectionError | asyncpg.PostgresError | asyncpg.InterfaceError
    )


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite://"):
        return None
    path = url.removeprefix("sqlite://").split("?")[0]
    return None if path in ("", ":memory:") else Path(path)


def sqlite_folder_problem(url: str) -> str | None:
    """Why this user cannot keep the SQLite file of ``url`` where it says, in one line; None if it can (or not SQLite).

    ``ai-platform serve`` checks it before starting: a folder that cannot be created, entered or
    written is a configuration error (issue 11), not an outage that retrying would end.
    """
    path = _sqlite_path(url)
    if path is None:
        return None
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return f"the SQLite folder {str(folder)!r} is a file, not a folder"
    except OSError as exc:
        return f"cannot create the SQLite folder {str(folder)!r}: {exc.strerror or exc}"
    if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
        return f"the SQLite folder {str(folder)!r} is not readable and writable by this user (uid {os.geteuid()})"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return f"the SQLite file {str(path)!r} is not readable and writable by this user (uid {os.geteuid()})"
    return None


def connection_url(url: str) -> str:
    """``url`` with SQLite's busy timeout and sync mode set unless the URL sets its own.

    Tortoise passes URL parameters as pragmas and uses WAL. ``synchronous=NORMAL`` under WAL
    keeps every committed transaction through a process crash (SIGKILL included) and skips an
    fsync per transaction: it cut the usage writes of one request from ~11 ms to ~4.5 ms here.
    Only a power loss or OS crash can lose the last transactions; ``?synchronous=FULL`` in
    ``DATABASE_URL`` trades that speed back.
    """
    if not url.startswith("sqlite://"):
        return url
    for pragma, value in (("busy_timeout", SQLITE_BUSY_TIMEOUT_MS), ("synchronous", "NORMAL")):
        if f"{pragma}=" not in url:
            url = f"{url}{'&' if '?' in url else '?'}{pragma}={value}"
    return url


def _create_private(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))


@asynccontextmanager
async def _migration_lock(url: str, client: BaseDBAsyncClient) -> AsyncIterator[None]:
    """Hold a lock shared by every process using this database while migrating."""
    sqlite_file = _sqlite_path(url)
    if sqlite_file is not None:
        lock_file = sqlite_file.with_name(sqlite_file.name + ".migrate-lock")
        _create_private(lock_file)
        fd = os.open(lock_file, os.O_RDWR)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock
    elif client.capabilities.dialect == "postgres":
        # Session-level lock on one pooled connection; migrations run on others.
        async with client.acquire_connection() as raw:
            await raw.execute(f"SELECT pg_advisory_lock({PG_MIGRATION_LOCK})")
            try:
                yield
            finally:
                await raw.execute(f"SELECT pg_advisory_unlock({PG_MIGRATION_LOCK})")
    else:
        yield


async def _is_unmigrated_legacy(client: BaseDBAsyncClient) -> bool:
    """A database created by ``generate_schemas`` before migrations: tables present, nothing recorded."""
    if await MigrationRecorder(client).applied_migrations():
        return False
    try:
        await client.execute_query("SELECT COUNT(*) FROM daily_usage")
    except DATABASE_ERRORS:
        return False
    return True


async def migrate(url: str, client: BaseDBAsyncClient) -> None:
    """Bring the schema of the database open on ``client`` up to date, in place (legacy databases are adopted first)."""
    async with _migration_lock(url, client):
        if await _is_unmigrated_legacy(client):
            await MigrationExecutor(client, APPS).migrate([BASELINE], fake=True)
        await MigrationExecutor(client, APPS).migrate()


def _jittered(seconds: float) -> float:
    # Workers and servers started together spread their attempts instead of arriving at once.
    return seconds * random.uniform(0.9, 1.1)


class Database:
    """One app's usage database: its URL, its transaction runner while it is open, and its health.

    ``create_app`` makes one and hands it to whoever needs it (the limit service, the
    audit trail, ``/health``); ``ai-platform migrate`` and tests make their own.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.health = _Health()
        self._transactions: Runner | None = None
        self._context: TortoiseContext | None = None

    def is_open(self) -> bool:
        """Whether the database is open in this process (it may still fail a request: see :meth:`status`)."""
        return self._transactions is not None

    def transactions(self) -> Runner:
        """Where the per-request transactions (``ai_platform.usage.statements``, ``ai_platform.limits.statements``)
        run while the database is open."""
        if self._transactions is None:
            raise self.not_open()
        return self._transactions

    def not_open(self) -> DatabaseUnavailableError:
        """The 503 for a call that needs the database before it is open."""
        wait = None if self.health.next_attempt is None else self.health.next_attempt - time.monotonic()
        # Retry-After: when the next attempt to open it runs (at least 1 s), else the usual 5 s.
        if wait is None:
            return DatabaseUnavailableError(UNAVAILABLE)
        return DatabaseUnavailableError(UNAVAILABLE, retry_after=max(1, math.ceil(wait)))

    def note_write(self, error: BaseException | None) -> None:
        """Record how a background write (the audit trail's) went, for ``/health``."""
        self.health.write_error = None if error is None else describe(error)

    async def status(self) -> DatabaseStatus:
        """This process's view of the database, for ``/health``.

        While it is open and no request has found it failing, nothing is queried. After
        a request's outage, it is probed (``SELECT 1``, 2 s at most), at most every
        ``PROBE_SECONDS``, so the status comes back by itself when the database does.
        """
        health, now = self.health, time.monotonic()
        if self._transactions is None or self._context is None:
            wait = None if health.next_attempt is None else max(health.next_attempt - now, 0.0)
            return DatabaseStatus(False, health.error or "not open", None if wait is None else round(wait, 1))
        if health.error is not None and now - health.checked >= PROBE_SECONDS:
            health.checked = now
            try:
                async with asyncio.timeout(2):
                    await self._context.db().execute_query("SELECT 1")
            except DATABASE_ERRORS as exc:
                health.error = describe(exc)
            else:
                health.error = None
        error = health.error or (f"writes fail: {health.write_error}" if health.write_error else None)
        return DatabaseStatus(error is None, error, None)

    # -- opening and closing ---------------------------------------------------------------

    async def _open(self) -> None:
        """Connect, migrate, and make the per-request transactions available; all or nothing."""
        url = self.url
        sqlite_file = _sqlite_path(url)
        if sqlite_file is not None and not sqlite_file.exists():
            _create_private(sqlite_file)
        # Request handlers run in other tasks than the lifespan: the global fallback
        # lets them see this context (as Tortoise's own framework integrations do). It is
        # the one process-wide piece left, and Tortoise's own: the ORM models find their
        # connection through the current context, and a task that did not open the
        # database has none but this fallback. Tortoise allows one per process: a second
        # app in this process opening its database while the first is open fails to start
        # (a ConfigurationError) rather than silently using the first one's.
        context = await Tortoise.init(
            db_url=connection_url(url), modules={"models": [MODELS_MODULE]}, _enable_global_fallback=True
        )
        try:
            client = context.db()
            # Tortoise connects lazily: connect now, within a bound (an unreachable host can hang for a minute).
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                await client.execute_query("SELECT 1")
            await migrate(url, client)
            runner = runner_for(client)
        except BaseException:
            await context.close_connections()
            raise
        self._context, self._transactions = context, runner
        self.health.error, self.health.next_attempt, self.health.write_error = None, None, None

    async def _close(self) -> None:
        if self._transactions is not None:
            self._transactions.close()
            self._transactions = None
        if self._context is not None:
            await self._context.close_connections()
            self._context = None

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[TortoiseContext]:
        """Open the database and migrate its schema, or raise; closed on exit (``ai-platform migrate``, tests).

        A SQLite file is created with mode 600: only the service user reads it.
        """
        await self._open()
        assert self._context is not None
        try:
            yield self._context
        finally:
            await self._close()

    @asynccontextmanager
    async def open_in_background(self, *, on_open: Callable[[], Awaitable[object]]) -> AsyncIterator[None]:
        """The database for the app's lifetime, without making it a condition of serving.

        The first attempt to open it runs before the app serves, so a normal start is
        complete when the server listens. If it fails with an outage (the server is
        down or not up yet, refused or timed out connections, a SQLite file that cannot
        be created or opened), the app starts anyway and further attempts run in the
        background, 1, 2, 4 … 30 s apart (±10%), each failure logged as a warning with
        its cause and the wait before the next. Until one succeeds, every call that
        needs the database answers 503 with ``Retry-After`` (``translate_errors``) and
        ``/health`` reports it. A malformed URL or an error that is not an outage (e.g.
        a failing migration) stops startup, as retrying cannot fix it.

        ``on_open`` runs once the database is open (crash recovery); it failing with an
        outage is logged and left to the reservation sweep.
        """
        expand_db_url(self.url)  # a malformed URL stops startup now rather than being retried forever
        retrying: asyncio.Task[None] | None = None
        try:
            try:
                await self._open()
            except DATABASE_ERRORS as exc:
                if not is_outage(exc):
                    raise
                delay = _jittered(RETRY_FIRST_SECONDS)
                self._failed(exc, attempt=1, delay=delay)
                retrying = asyncio.create_task(self._keep_trying(on_open, delay), name="usage-database-open")
            else:
                await _opened(on_open)
            yield
        finally:
            if retrying is not None:
                retrying.cancel()
                await asyncio.gather(retrying, return_exceptions=True)
            self.health.next_attempt = None
            await self._close()

    def _failed(self, exc: BaseException, *, attempt: int, delay: float) -> None:
        self.health.error = describe(exc)
        self.health.next_attempt = time.monotonic() + delay
        log.warning(
            "usage database unavailable (attempt %d): %s; next attempt in %.1f s; meanwhile requests that need it get 503",
            attempt,
            self.health.error,
            delay,
            exc_info=None if is_outage(exc) else exc,  # not an outage: probably a bug, so the traceback too
        )

    async def _keep_trying(self, on_open: Callable[[], Awaitable[object]], delay: float) -> None:
        attempt, wait = 1, RETRY_FIRST_SECONDS
        while True:
            await asyncio.sleep(delay)
            attempt += 1
            try:
                await self._open()
            except Exception as exc:  # serving already: nothing better to do than to report it and try again
                wait = min(wait * 2, RETRY_MAX_SECONDS)
                delay = _jittered(wait)
                self._failed(exc, attempt=attempt, delay=delay)
                continue
            log.info("usage database open after %d attempts", attempt)
            try:
                await _opened(on_open)
            except Exception:
                log.exception("after opening the usage database")
            return


async def _opened(on_open: Callable[[], Awaitable[object]]) -> None:
    try:
        await on_open()
    except DatabaseUnavailableError as exc:
        log.warning("after opening the usage database: %s; the reservation sweep will catch up", describe(exc))
