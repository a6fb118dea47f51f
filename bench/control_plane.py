"""The control plane's ceiling (issue 14): requests/s at exact limits as API processes grow.

Serves the real app (uvicorn workers = processes, as ``ai-platform serve --workers N``: httptools
with its header limits, auth, validation, limits, usage, audit, the three seed operations) with an
engine that answers instantly, on a fresh database per run: SQLite, or one throwaway PostgreSQL
cluster (``tests/reliability/harness.PostgresServer``; ``postgres`` uses its test settings,
fsync off; ``postgres-durable`` turns fsync and synchronous_commit back on). A closed-loop load
generator in its own process (raw HTTP/1.1 keep-alive connections on uvloop, each request's bytes
built once) keeps ``--connections`` requests in flight for a warm-up, then a measured window.

Scenarios (the rows every admission locks):

* ``hot``: one operation, one key: every admission and settlement locks the same operation row
  and the same key row (``daily_usage``, ``key_daily_usage``).
* ``keys``: one operation, 64 keys: the operation's row is shared, the key rows are spread.
* ``spread``: three operations, 64 keys: three operation rows, the key rows spread.
* ``stub``: ``hot``, with the limit service's admission and settlement replaced by no-ops in the
  server (nothing exact any more; audit rows are still written): what the API processes serve
  without the counter rows, the ceiling the limits are compared against.

Per run: requests/s in the window, p50/p99 latency, CPU used by the server's processes, PostgreSQL,
the load generator and everything else on the machine (psutil), per request; inside the server,
each admission, settlement and audit transaction's wall time (the usage database's runner wrapped,
bench-side); on PostgreSQL, ``pg_stat_activity`` sampled every 20 ms: backends waiting for a lock
(``wait_event_type = 'Lock'``: the counter row) and idle in a transaction (holding its locks while
the API process runs). After each run: 200s received == usage rows (operation and key counters) ==
audit rows with status 200, no reservation left; with ``--limit-run L``, the limit is reached
mid-run and the 200s must be exactly L.

``--direct``: the admission and settlement transactions alone (``ai_platform.limits.statements``
on the server's own runners), from 1, 2, 4, 8 processes x 5 tasks (the server's pool size), every
task on the same operation and key rows (hot) or each on rows of its own (spread); and one task
alone (no contention: a transaction's own latency, which bounds how often one row can change).

    .venv/bin/python bench/control_plane.py [--backends sqlite,postgres] [--processes 1,2,4,8]
        [--scenarios hot,keys,spread,stub] [--rounds 3] [--duration 12] [--limit-run [L]] [--direct]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KEYS = [f"bench-client-key-{i:04d}-0123456789" for i in range(64)]
ADMIN_KEY = "bench-admin-key-0123456789"
HIGH_LIMIT = 1_000_000_000
TEXT = "The meeting moved to Thursday. Bring the budget figures and the draft contract."
BODIES = {
    "summarize": {"text": TEXT, "max_sentences": 1},
    "translate": {"text": TEXT, "source_language": "en", "target_language": "fr"},
    "classify": {"text": TEXT, "categories": ["billing", "technical_support", "sales", "general_inquiry"]},
}
SCENARIOS = {  # name: (operations, keys, limits stubbed)
    "hot": (["summarize"], 1, False),
    "keys": (["summarize"], 64, False),
    "spread": (["summarize", "translate", "classify"], 64, False),
    "stub": (["summarize"], 1, True),
}
STUB_VARIABLE = "CONTROL_PLANE_STUB_LIMITS"
STATS_VARIABLE = "CONTROL_PLANE_STATS_DIR"


# -- the server (each uvicorn worker) -------------------------------------------------------


class TimedRunner:
    """The usage database's runner, timing each transaction by its kind (the generator's name)."""

    def __init__(self, inner: Any, stats: dict[str, list[float]]) -> None:
        self._inner = inner
        self._stats = stats

    async def run(self, transaction: Any) -> Any:
        kind = transaction.gi_code.co_name
        started = time.perf_counter()
        try:
            return await self._inner.run(transaction)
        finally:
            entry = self._stats.setdefault(kind, [0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - started

    def close(self) -> None:
        self._inner.close()


def _stub_limits() -> None:
    """Admission and settlement without the database (``stub``): what serving costs without the counters."""
    from ai_platform.limits.service import LimitService, RateLimit, Reservation

    async def admit(self: LimitService, operation: str, key_id: str) -> Reservation:
        return Reservation(0, operation, key_id, self.today(), RateLimit(HIGH_LIMIT, HIGH_LIMIT, 86400))

    async def settle(self: LimitService, reservation: Reservation, **_: object) -> None:
        return None

    LimitService.admit = admit  # type: ignore[method-assign]
    LimitService.commit = settle  # type: ignore[method-assign]
    LimitService.release = settle  # type: ignore[method-assign]


def app_factory() -> object:
    """The app over the instant engine (uvicorn calls this in each worker), its transactions timed."""
    from _instant_server import instant_engine

    from ai_platform.app import create_app
    from ai_platform.settings import Settings
    from ai_platform.usage import database

    stats: dict[str, list[float]] = {}
    state = {"open": False}
    runner_for = database.runner_for

    def timed_runner_for(client: Any) -> TimedRunner:
        state["open"] = True
        return TimedRunner(runner_for(client), stats)

    database.runner_for = timed_runner_for  # type: ignore[assignment]
    if os.environ.get(STUB_VARIABLE) == "1":
        _stub_limits()
    path = Path(os.environ[STATS_VARIABLE]) / f"{os.getpid()}.json"

    def dump() -> None:  # cumulative; the bench diffs two reads
        while True:
            snapshot = {"open": state["open"], "stats": {k: list(v) for k, v in list(stats.items())}}
            path.with_suffix(".tmp").write_text(json.dumps(snapshot))
            path.with_suffix(".tmp").replace(path)
            time.sleep(0.1)

    threading.Thread(target=dump, daemon=True).start()
    settings = Settings.from_env(env_file=None)
    return create_app(settings, engine=instant_engine(dict(settings.operation_model_map)))


def serve_main(port: int, workers: int) -> None:
    import uvicorn

    from ai_platform.cli import uvicorn_options

    uvicorn.run(  # as ``ai-platform serve`` runs it (cli.cmd_serve), with this module's factory
        "control_plane:app_factory",
        factory=True,
        host="127.0.0.1",
        port=port,
        workers=workers,
        timeout_graceful_shutdown=5,
        **uvicorn_options(),
    )


# -- the load generator (its own process) -----------------------------------------------------


def _request(operation: str, key: str) -> bytes:
    body = json.dumps(BODIES[operation]).encode()
    head = (
        f"POST /operations/{operation} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"X-API-Key: {key}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def load_main(port: int, connections: int, operations: list[str], keys: int, warmup: float, duration: float) -> None:
    """Closed loop: each connection sends its next request when the last answer is in. Prints START/END, then JSON."""
    import uvloop

    requests = [[_request(op, KEYS[k]) for op in operations] for k in range(keys)]
    total: Counter[int] = Counter()
    window: Counter[int] = Counter()
    by_operation: Counter[str] = Counter()
    latencies: list[float] = []
    phase = {"measuring": False, "stop": False}
    length_pattern = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")

    async def connection(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        mine, n = requests[i % keys], i
        while not phase["stop"]:
            request = mine[n % len(mine)]
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            match = length_pattern.search(head)
            await reader.readexactly(int(match[1]) if match else 0)
            status = int(head[9:12])
            total[status] += 1
            if status == 200:
                by_operation[operations[n % len(mine)]] += 1
            if phase["measuring"]:
                window[status] += 1
                latencies.append(time.perf_counter() - started)
            n += 1
        writer.close()

    async def main() -> float:
        tasks = [asyncio.ensure_future(connection(i)) for i in range(connections)]
        await asyncio.sleep(warmup)
        phase["measuring"] = True
        started = time.perf_counter()
        print("START", flush=True)
        await asyncio.sleep(duration)
        phase["measuring"] = False
        elapsed = time.perf_counter() - started
        print("END", flush=True)
        phase["stop"] = True
        await asyncio.gather(*tasks)  # every request sent gets its answer: the 200s are all counted
        return elapsed

    elapsed = uvloop.run(main())
    latencies.sort()
    print(
        json.dumps(
            {
                "elapsed": elapsed,
                "window": {str(k): v for k, v in window.items()},
                "total": {str(k): v for k, v in total.items()},
                "ok_by_operation": dict(by_operation),
                "p50": latencies[len(latencies) // 2] if latencies else None,
                "p99": latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
            }
        ),
        flush=True,
    )


# -- the transactions alone (--direct; each process) -------------------------------------------


def direct_main(url: str, tasks: int, rows: str, index: int, warmup: float, duration: float) -> None:
    """Admission then settlement, back to back in ``tasks`` tasks, on the server's runner.

    Prints READY, starts on a line from stdin, counts for ``duration`` after ``warmup``, stops on the next line.
    """
    import socket
    from datetime import UTC, datetime, timedelta

    import psutil

    from ai_platform.limits import statements
    from ai_platform.usage.database import Database

    owner = (socket.gethostname(), os.getpid(), psutil.Process().create_time())
    counts = {"pairs": 0, "admission": 0.0, "settlement": 0.0}
    phase = {"measuring": False, "stop": False}

    async def worker(database: Database, t: int) -> None:
        runner, n = database.transactions(), t
        while not phase["stop"]:
            # hot: every task on the same operation row and key row; spread: rows of its own, shared with no one.
            operation = "summarize" if rows == "hot" else f"op-{index}-{t}"
            key = "k0" if rows == "hot" else f"k{index}-{t}"
            day = datetime.now(UTC).date()
            expires = datetime.now(UTC) + timedelta(minutes=6)
            started = time.perf_counter()
            admitted = await runner.run(statements.admission(operation, key, day, HIGH_LIMIT, owner, expires))
            middle = time.perf_counter()
            await runner.run(statements.settlement(admitted.reservation_id, operation, key, day, tokens=6))
            if phase["measuring"]:
                counts["pairs"] += 1
                counts["admission"] += middle - started
                counts["settlement"] += time.perf_counter() - middle
            n += 1

    async def main() -> None:
        database = Database(url)
        async with database.opened():
            print("READY", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            running = [asyncio.ensure_future(worker(database, t)) for t in range(tasks)]
            await asyncio.sleep(warmup)
            phase["measuring"] = True
            await asyncio.sleep(duration)
            phase["measuring"] = False
            # Keep the database busy until the bench has read the CPU times (its backends end with us).
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            phase["stop"] = True
            await asyncio.gather(*running)
        print(json.dumps(counts), flush=True)

    asyncio.run(main())


# -- the bench ---------------------------------------------------------------------------------


def _pg_harness() -> Any:
    sys.path.insert(0, str(ROOT / "tests" / "reliability"))
    sys.path.insert(0, str(ROOT / "tests"))
    import harness

    return harness


@dataclass
class Backend:
    name: str
    root: Path
    server: Any = None  # harness.PostgresServer

    def new_url(self, folder: Path) -> str:
        if self.server is None:
            return f"sqlite://{folder / 'usage.sqlite3'}"
        return str(self.server.new_database())

    def postmaster(self) -> int | None:
        if self.server is None:
            return None
        return int((self.root / "data" / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def start_backend(name: str) -> Backend:
    root = Path(tempfile.mkdtemp(prefix=f"control-plane-{name}-"))
    if name == "sqlite":
        return Backend(name, root)
    harness = _pg_harness()

    class Durable(harness.PostgresServer):  # type: ignore[name-defined,misc]
        """Production's durability: every commit waits for its WAL flush (while holding its row locks)."""

        def start(self) -> None:
            options = (
                f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=on "
                "-c synchronous_commit=on -c full_page_writes=on -c max_connections=300"
            )
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.root / "data"), "-l", str(self.root / "log"),
                      "-o", options, "-w", "start")  # fmt: skip

    kind = Durable if name == "postgres-durable" else harness.PostgresServer
    server = kind(harness.pg_bindir(), root)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    server.init()
    server.start()
    return Backend(name, root, server)


def _tree(pid: int | None) -> list[Any]:
    import psutil

    if pid is None:
        return []
    try:
        process = psutil.Process(pid)
        return [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_snapshot(groups: dict[str, list[int | None]]) -> dict[str, Any]:
    """CPU seconds used so far by each group's process trees (by pid), and the machine's busy seconds."""
    import psutil

    snapshot: dict[str, Any] = {}
    for group, roots in groups.items():
        seconds: dict[int, float] = {}
        for root in roots:
            for process in _tree(root):
                with contextlib.suppress(psutil.Error):
                    times = process.cpu_times()
                    seconds[process.pid] = times.user + times.system
        snapshot[group] = seconds
    machine = psutil.cpu_times()
    snapshot["_busy"] = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
    return snapshot


def cpu_used(start: dict[str, Any], end: dict[str, Any]) -> dict[str, float]:
    used = {
        group: sum(v - start[group].get(pid, 0.0) for pid, v in seconds.items())
        for group, seconds in end.items()
        if group != "_busy"
    }
    used["machine"] = end["_busy"] - start["_busy"]
    used["other"] = used["machine"] - sum(v for k, v in used.items() if k != "machine")
    return used


def read_stats(folder: Path) -> dict[str, list[float]]:
    total: dict[str, list[float]] = {}
    for path in folder.glob("*.json"):
        with contextlib.suppress(ValueError, OSError):
            for kind, (count, seconds) in json.loads(path.read_text())["stats"].items():
                entry = total.setdefault(kind, [0, 0.0])
                entry[0] += count
                entry[1] += seconds
    return total


class LockSampler(threading.Thread):
    """``pg_stat_activity`` of the bench database every 20 ms: backends waiting for a lock, idle in a transaction."""

    QUERY = """
        SELECT count(*) FILTER (WHERE state = 'active' AND wait_event_type = 'Lock') AS lock_wait,
               count(*) FILTER (WHERE state = 'active' AND wait_event_type IS DISTINCT FROM 'Lock') AS active,
               count(*) FILTER (WHERE state LIKE 'idle in transaction%') AS idle_in_transaction,
               string_agg(DISTINCT wait_event, ',') FILTER (WHERE wait_event_type = 'Lock') AS lock_events
        FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()"""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.samples: list[tuple[int, int, int]] = []
        self.events: Counter[str] = Counter()
        self.running = True
        self.ready = threading.Event()

    def run(self) -> None:
        import asyncpg

        async def sample() -> None:
            connection = await asyncpg.connect(self.url)
            database = self.url.rsplit("/", 1)[1]
            self.ready.set()
            try:
                while self.running:
                    row = await connection.fetchrow(self.QUERY, database)
                    self.samples.append((row["lock_wait"], row["active"], row["idle_in_transaction"]))
                    for event in (row["lock_events"] or "").split(","):
                        if event:
                            self.events[event] += 1
                    await asyncio.sleep(0.02)
            finally:
                await connection.close()

        asyncio.run(sample())

    def mean(self, column: int) -> float:
        return statistics.fmean(s[column] for s in self.samples) if self.samples else 0.0


@dataclass
class Run:
    backend: str
    scenario: str
    processes: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu: dict[str, float]  # seconds in the window per group
    stats: dict[str, list[float]]  # in the window: kind -> [count, seconds]
    lock_wait: float | None  # mean backends waiting for a lock
    idle_in_transaction: float | None
    lock_events: dict[str, int]
    exact: str
    window_requests: int
    statuses: dict[str, int]
    load: float
    elapsed: float


def _query(url: str, sql: str) -> list[tuple[object, ...]]:
    return _pg_harness().query(url, sql)  # type: ignore[no-any-return]


def check_exact(url: str, received: dict[str, int], limit: int | None) -> str:
    """Every 200 received is in the counters and the audit, and no more; with a limit, exactly the limit."""
    usage = dict(_query(url, "SELECT operation, SUM(request_count) FROM daily_usage GROUP BY operation"))
    usage = {str(k): int(v) for k, v in usage.items() if v}  # type: ignore[call-overload]
    key_total = int(_query(url, "SELECT COALESCE(SUM(request_count), 0) FROM key_daily_usage")[0][0])  # type: ignore[call-overload]
    audit = int(
        _query(url, "SELECT COUNT(*) FROM audit_record WHERE status = 200 AND path LIKE '/operations/%'")[0][0]  # type: ignore[call-overload]
    )
    left = int(_query(url, "SELECT COUNT(*) FROM reservation")[0][0])  # type: ignore[call-overload]
    ok = sum(received.values())
    problems = []
    if usage != received:
        problems.append(f"usage {usage} != 200s {received}")
    if key_total != ok:
        problems.append(f"key rows {key_total} != {ok}")
    if audit != ok:
        problems.append(f"audit {audit} != {ok}")
    if left:
        problems.append(f"{left} reservations left")
    if limit is not None and ok != limit:
        problems.append(f"200s {ok} != limit {limit}")
    return "; ".join(problems) or f"ok ({ok} = usage = audit)"


def one_run(
    backend: Backend, scenario: str, processes: int, args: argparse.Namespace, *, limit: int | None = None
) -> Run:
    import httpx
    from _server import bench_env, free_port

    operations, keys, stub = SCENARIOS[scenario]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="control-plane-run-") as tmp:
        folder = Path(tmp)
        url = backend.new_url(folder)
        stats_dir = folder / "stats"
        stats_dir.mkdir()
        env = bench_env(
            folder,
            folder,
            DATABASE_URL=url,
            VALID_API_KEYS=json.dumps(KEYS),
            ADMIN_API_KEYS=json.dumps([ADMIN_KEY]),
            ENABLED_PLUGINS="summarize,translate,classify",
            **{STATS_VARIABLE: str(stats_dir), STUB_VARIABLE: "1" if stub else "0"},
        )
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
        port = free_port()
        output = folder / "server.log"
        with output.open("wb") as sink:
            server = subprocess.Popen(
                [sys.executable, __file__, "_serve", str(port), str(processes)],
                env={**os.environ, **env},
                cwd=folder,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait_ready(server, port, stats_dir, processes, output)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": ADMIN_KEY}) as admin:
                for operation in BODIES:
                    daily = limit if limit is not None and operation == operations[0] else HIGH_LIMIT
                    admin.put("/limits", json={"operation": operation, "daily_limit": daily}).raise_for_status()
            command = [sys.executable, __file__, "_load", str(port), str(args.connections), ",".join(operations)]
            command += [str(keys), str(args.warmup), str(args.duration)]
            loader = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
            groups = {"server": [server.pid], "postgres": [backend.postmaster()], "loadgen": [loader.pid]}
            groups["bench"] = [os.getpid()]
            assert loader.stdout is not None
            assert loader.stdout.readline().strip() == "START"
            sampler = None
            if backend.server is not None:
                sampler = LockSampler(url)
                sampler.start()
                sampler.ready.wait(5)
            cpu_start, stats_start = cpu_snapshot(groups), read_stats(stats_dir)
            assert loader.stdout.readline().strip() == "END"
            cpu_end, stats_end = cpu_snapshot(groups), read_stats(stats_dir)
            if sampler is not None:
                sampler.running = False
                sampler.join()
            result = json.loads(loader.stdout.readline())
            loader.wait()
        finally:
            _stop(server)
        received = {op: n for op, n in result["ok_by_operation"].items() if n}
        exact = "stubbed: not counted" if stub else check_exact(url, received, limit)
    window = {k: int(v) for k, v in result["window"].items()}
    stats = {
        k: [v[0] - stats_start.get(k, [0, 0.0])[0], v[1] - stats_start.get(k, [0, 0.0])[1]]
        for k, v in stats_end.items()
    }
    return Run(
        backend=backend.name,
        scenario=scenario,
        processes=processes,
        rps=sum(window.values()) / result["elapsed"],
        p50_ms=(result["p50"] or 0) * 1000,
        p99_ms=(result["p99"] or 0) * 1000,
        cpu=cpu_used(cpu_start, cpu_end),
        stats=stats,
        lock_wait=sampler.mean(0) if sampler else None,
        idle_in_transaction=sampler.mean(2) if sampler else None,
        lock_events=dict(sampler.events) if sampler else {},
        exact=exact,
        window_requests=sum(window.values()),
        statuses={str(k): v for k, v in result["total"].items()},
        load=load,
        elapsed=result["elapsed"],
    )


def _wait_ready(server: subprocess.Popen[bytes], port: int, stats_dir: Path, workers: int, output: Path) -> None:
    """Every worker has opened the usage database, and the server answers."""
    import httpx

    deadline = time.monotonic() + 120
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start:\n{output.read_text()[-3000:]}")
        opened = 0
        for path in stats_dir.glob("*.json"):
            with contextlib.suppress(ValueError, OSError):
                opened += json.loads(path.read_text())["open"]
        if opened >= workers:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    return
        time.sleep(0.2)


def _stop(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)  # graceful: the audit trail writes its last rows
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def direct_run(
    backend: Backend, processes: int, rows: str, args: argparse.Namespace, *, tasks: int = 5
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="control-plane-direct-") as tmp:
        url = backend.new_url(Path(tmp))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
        workers = []
        for index in range(processes):
            command = [sys.executable, __file__, "_direct", url, str(tasks), rows, str(index), "1"]
            command.append(str(args.direct_duration))
            workers.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
        for worker in workers:
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "READY"
        groups = {"clients": [w.pid for w in workers], "postgres": [backend.postmaster()]}
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("GO\n")
            worker.stdin.flush()
        time.sleep(1)
        start = cpu_snapshot(groups)
        time.sleep(args.direct_duration)
        cpu = cpu_used(start, cpu_snapshot(groups))
        results = [json.loads(w.communicate("STOP\n")[0].strip().splitlines()[-1]) for w in workers]
    pairs = sum(r["pairs"] for r in results)
    return {
        "pairs_per_s": pairs / args.direct_duration,
        "admission_ms": 1000 * sum(r["admission"] for r in results) / max(pairs, 1),
        "settlement_ms": 1000 * sum(r["settlement"] for r in results) / max(pairs, 1),
        "clients_cpu": cpu["clients"] / args.direct_duration,
        "postgres_cpu": cpu["postgres"] / args.direct_duration,
        "other_cpu": cpu["other"] / args.direct_duration,
    }


def _half_a_run(runs: list[Run], backend: str, args: argparse.Namespace) -> int:
    """Half the requests the hot scenario served in a run's time (warm-up included) on ``backend``."""
    served = [r.rps for r in runs if (r.backend, r.scenario) == (backend, "hot")] or [200.0]
    return max(int(statistics.median(served) * (args.warmup + args.duration) / 2), 100)


def _per_request_us(run: Run, group: str) -> float:
    return 1e6 * run.cpu.get(group, 0.0) / max(run.window_requests, 1)


def report(runs: list[Run], limit_runs: list[Run], direct: list[tuple[str, int, str, dict[str, float]]]) -> None:
    cores = os.cpu_count() or 1
    configs: dict[tuple[str, str, int], list[Run]] = {}
    for run in runs:
        configs.setdefault((run.backend, run.scenario, run.processes), []).append(run)
    print(f"\n### Requests/s at exact limits ({cores} cores; median of rounds)\n")
    print("| backend | scenario | processes | req/s | rounds' req/s | vs 1 process | p50 ms | p99 ms "
          "| CPU % server / PG / loadgen / other (of the machine) | load avg | exact (last round) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (backend, scenario, processes), group in configs.items():
        base = configs.get((backend, scenario, min(p for b, s, p in configs if (b, s) == (backend, scenario))))
        rps = statistics.median(r.rps for r in group)
        ratio = rps / statistics.median(r.rps for r in base) if base else 1.0
        middle = sorted(group, key=lambda r: r.rps)[len(group) // 2]
        share = {k: 100 * v / (cores * middle.elapsed) for k, v in middle.cpu.items()}
        cpu = f"{share['server']:.0f} / {share['postgres']:.0f} / {share['loadgen']:.0f} / {share['other'] + share['bench']:.0f}"
        rounds = ", ".join(f"{r.rps:.0f}" for r in group)
        print(f"| {backend} | {scenario} | {processes} | **{rps:.0f}** | {rounds} | {ratio:.2f} | {middle.p50_ms:.1f} "
              f"| {middle.p99_ms:.1f} | {cpu} | {statistics.median(r.load for r in group):.1f} | {group[-1].exact} |")  # fmt: skip
    print("\n### Where the time goes (the median round of each point)\n")
    print("| backend | scenario | processes | admission ms | settlement ms | audit txn/s | PG backends waiting "
          "for a lock | idle in transaction | CPU µs/request: server / PG / loadgen |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for (backend, scenario, processes), group in configs.items():
        run = sorted(group, key=lambda r: r.rps)[len(group) // 2]

        def mean_ms(kind: str, run: Run = run) -> str:
            count, seconds = run.stats.get(kind, [0, 0.0])
            return f"{1000 * seconds / count:.2f}" if count else "-"

        audits = run.stats.get("audit_rows", [0, 0.0])[0] / run.elapsed
        lock = "-" if run.lock_wait is None else f"{run.lock_wait:.2f}"
        if run.lock_events:
            lock += " (" + ", ".join(f"{k} {v}" for k, v in sorted(run.lock_events.items())) + ")"
        idle = "-" if run.idle_in_transaction is None else f"{run.idle_in_transaction:.2f}"
        cpu = " / ".join(f"{_per_request_us(run, g):.0f}" for g in ("server", "postgres", "loadgen"))
        print(f"| {backend} | {scenario} | {processes} | {mean_ms('admission')} | {mean_ms('settlement')} "
              f"| {audits:.1f} | {lock} | {idle} | {cpu} |")  # fmt: skip
    if limit_runs:
        print("\n### The limit reached mid-run\n")
        print("| backend | processes | limit | statuses received | exact |")
        print("|---|---|---|---|---|")
        for run in limit_runs:
            print(f"| {run.backend} | {run.processes} | {run.scenario} | {run.statuses} | {run.exact} |")
    if direct:
        print("\n### The limit transactions alone (admission + settlement; 5 tasks per process, as the pool)\n")
        print(
            "| backend | processes | rows | pairs/s | admission ms | settlement ms | CPU cores: clients / PG / other |"
        )
        print("|---|---|---|---|---|---|---|")
        for backend, processes, rows, d in direct:
            print(f"| {backend} | {processes} | {rows} | {d['pairs_per_s']:.0f} | {d['admission_ms']:.2f} "
                  f"| {d['settlement_ms']:.2f} | {d['clients_cpu']:.2f} / {d['postgres_cpu']:.2f} / {d['other_cpu']:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="sqlite,postgres", help="sqlite, postgres, postgres-durable")
    parser.add_argument("--processes", default="1,2,4,8")
    parser.add_argument("--scenarios", default="hot,keys,spread,stub")
    parser.add_argument("--stub-backends", default="postgres", help="backends the stub scenario runs on")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=12.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--limit-run",
        type=int,
        nargs="?",
        const=0,
        help="also a run per backend whose summarize limit is reached mid-run: this limit, or "
        "(no value) half of what the hot runs served in as long",
    )
    parser.add_argument("--limit-processes", type=int, default=4)
    parser.add_argument("--direct", action="store_true", help="also the transactions alone, without HTTP")
    parser.add_argument("--direct-duration", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="also write every run here")
    args = parser.parse_args()
    backends_wanted = args.backends.split(",")
    plan = [
        (b, s, int(p))
        for b in backends_wanted
        for s in args.scenarios.split(",")
        for p in args.processes.split(",")
        if s != "stub" or b in args.stub_backends.split(",")
    ]
    print(f"load average before: {os.getloadavg()}", flush=True)
    backends = {name: start_backend(name) for name in backends_wanted}
    runs: list[Run] = []
    limit_runs: list[Run] = []
    direct: list[tuple[str, int, str, dict[str, float]]] = []
    try:
        for round_ in range(args.rounds):
            for backend, scenario, processes in plan:
                run = one_run(backends[backend], scenario, processes, args)
                runs.append(run)
                print(f"round {round_ + 1}: {backend} {scenario} x{processes}: {run.rps:.0f} req/s, "
                      f"p50 {run.p50_ms:.1f} ms, load {run.load:.1f}, {run.exact}", flush=True)  # fmt: skip
        if args.limit_run is not None:
            for name, backend in backends.items():
                limit = args.limit_run or _half_a_run(runs, name, args)
                run = one_run(backend, "hot", args.limit_processes, args, limit=limit)
                run.scenario = str(limit)
                limit_runs.append(run)
                print(f"limit run {name}: {run.statuses} {run.exact}", flush=True)
        if args.direct:
            for name, backend in backends.items():
                d = direct_run(backend, 1, "hot", args, tasks=1)
                direct.append((name, 1, "one task", d))
                print(f"direct {name} one task: {d}", flush=True)
                for rows in ("hot", "spread"):
                    for processes in [int(p) for p in args.processes.split(",")]:
                        d = direct_run(backend, processes, rows, args)
                        direct.append((name, processes, rows, d))
                        print(f"direct {name} {rows} x{processes}: {d}", flush=True)
    finally:
        for backend in backends.values():
            backend.stop()
    print(f"load average after: {os.getloadavg()}")
    report(runs, limit_runs, direct)
    if args.json:
        args.json.write_text(json.dumps([vars(r) for r in runs + limit_runs] + [list(d) for d in direct], indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        serve_main(int(sys.argv[2]), int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_load":
        port, connections, operations, keys, warmup, duration = sys.argv[2:8]
        load_main(int(port), int(connections), operations.split(","), int(keys), float(warmup), float(duration))
    elif len(sys.argv) > 1 and sys.argv[1] == "_direct":
        url, tasks, rows, index, warmup, duration = sys.argv[2:8]
        direct_main(url, int(tasks), rows, int(index), float(warmup), float(duration))
    else:
        main()
