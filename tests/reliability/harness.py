"""Test harness of the reliability suite: a throwaway PostgreSQL server, server processes, direct queries."""

from __future__ import annotations

import asyncio
import glob
import os
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import psutil

from support import free_port, missing_system_tool, require_program

T = TypeVar("T")
HERE = Path(__file__).resolve().parent


def run_sync(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` to completion from sync code, even when called inside a running event loop."""
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, work).result()


def _version(bindir: str) -> tuple[int, ...]:
    """(16,) for /usr/lib/postgresql/16/bin: 16 sorts after 9."""
    return tuple(int(part) for part in Path(bindir).parent.name.split(".") if part.isdigit())


def pg_bindir() -> Path:
    """Where PostgreSQL's server programs are: ``AI_PLATFORM_PG_BINDIR`` if set (only there), else PATH, then
    the newest /usr/lib/postgresql/*/bin (Debian keeps them off PATH). Missing, the PostgreSQL tests skip,
    or fail where AI_PLATFORM_REQUIRE_SYSTEM_TOOLS is set (support.require_program)."""
    override = os.environ.get("AI_PLATFORM_PG_BINDIR")
    if override:
        folders = [override]
    else:
        versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
        folders = [os.environ.get("PATH", os.defpath), *versions]
    bindir = Path(require_program("pg_ctl", "postgresql", folders=folders)).resolve().parent
    if not (bindir / "initdb").is_file():
        missing_system_tool(f"initdb (next to {bindir / 'pg_ctl'})", "postgresql")
    return bindir


@dataclass
class PostgresServer:
    """A private cluster on a free loopback port, trust auth, run as ``postgres`` when we are root."""

    bindir: Path
    root: Path
    port: int = field(default_factory=free_port)

    def _run(self, *args: str) -> None:
        # initdb and postgres refuse to run as root.
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def init(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.root / "data"), "-U", "aiplatform",
                  "--auth=trust", "-E", "UTF8", "--no-sync")  # fmt: skip

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")  # fmt: skip
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-l", str(self.root / "log"),
                  "-o", options, "-w", "start")  # fmt: skip

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")

    def url(self, database: str) -> str:
        return f"postgres://aiplatform@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its Tortoise URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"

        async def create() -> None:
            connection = await asyncpg.connect(self.url("postgres"))
            try:
                await connection.execute(f'CREATE DATABASE "{name}"')
            finally:
                await connection.close()

        run_sync(create())
        return self.url(name)


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    output: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def workers(self) -> list[psutil.Process]:
        """The uvicorn worker processes (the process itself when it serves alone)."""
        children = psutil.Process(self.process.pid).children()
        return [c for c in children if "multiprocessing" in " ".join(c.cmdline())] or [psutil.Process(self.process.pid)]

    def wait_ready(self, workers: int, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while True:
            assert self.process.poll() is None, f"server exited:\n{self.output.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server not ready:\n{self.output.read_text()[-3000:]}"
            try:
                # Every worker logs its own startup; all must have migrated and recovered.
                if self.output.read_text().count("Application startup complete") >= workers:
                    httpx.get(f"{self.base_url}/health", timeout=5).raise_for_status()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)

    def kill(self) -> None:
        for worker in self.workers():
            worker.kill()
        self.process.kill()
        self.process.wait()


def query(database_url: str, sql: str) -> list[tuple[object, ...]]:
    """Run one read-only query directly on the test database (SQLite file or PostgreSQL)."""
    if database_url.startswith("sqlite://"):
        connection = sqlite3.connect(database_url.removeprefix("sqlite://"))
        try:
            return connection.execute(sql).fetchall()
        finally:
            connection.close()

    async def fetch() -> list[tuple[object, ...]]:
        connection = await asyncpg.connect(database_url)
        try:
            return [tuple(r) for r in await connection.fetch(sql)]
        finally:
            await connection.close()

    return run_sync(fetch())
