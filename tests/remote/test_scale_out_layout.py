"""The scale-out layout of deploy/README.md ("Scale out: several machines") on one machine (issue 14, item 4).

Two API servers (``ai-platform serve --workers 2`` and ``ai-platform serve``) on one PostgreSQL, behind the
real nginx with ``deploy/nginx/ai-platform-upstream.conf`` (only its ports, servers and certificate changed),
every operation on one real remote engine: a second AI Platform serving the demo model on ``/v1``
(``remote_engines.platform_engine``; classify with ``choose=logprobs`` from its ``/v1``). Through
nginx: a daily limit and a key's quota stay exact across the servers, and when one server is killed
(SIGKILL, all its processes) nginx sends the next requests to the other, never resends a POST that reached
the dead one, and nothing is counted twice.

The counting invariant after the kill (README.md, "API": a request is counted iff it returned 200, the
count committed just before the 200 is sent): with ``answered`` the 200s the client received and
``lost`` the requests nginx answered 503 because the killed server dropped them mid-request (each one
either not admitted yet, admitted, or committed in the window before its 200 was sent)::

    answered <= counted <= answered + lost

where ``counted`` is the key's ``request_count`` less its reservations still open (admitted requests of the
dead processes); those are given back when a server starts again on that host (``recover``), or after
their lease, by any server. ``request_count`` itself never exceeds ``answered + lost``, and no request id
reaches an API server twice (the audit rows).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from ai_platform.testing import ADMIN_KEY, CLIENT_KEY, platform_env
from remote_engines import RunningEngine
from support import ROOT, free_port

for _helpers in ("reliability", "deploy"):  # the PostgreSQL and nginx harnesses of those suites
    if str(ROOT / "tests" / _helpers) not in sys.path:
        sys.path.insert(0, str(ROOT / "tests" / _helpers))

from deploy_harness import (  # noqa: E402
    NGINX_CONF,
    distro_nginx_conf,
    main_config,
    running_nginx,
    self_signed_certificate,
    substitute,
)

from harness import PostgresServer, ServerProcess, pg_bindir, query  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.demo_model]

UPSTREAM_CONF = NGINX_CONF.with_name("ai-platform-upstream.conf")
AI_PLATFORM = Path(sys.executable).parent / "ai-platform"
KEY_ENV = "AI_PLATFORM_SCALE_OUT_ENGINE_KEY"  # the API servers read the engine's key from it (?key_env=)
QUOTA_KEY = "test-quota-client-key-0123456789"  # has a quota on translate
FAILOVER_KEY = "test-failover-client-key-0123456789"  # only the failover test uses it
ADMIN = {"X-API-Key": ADMIN_KEY}
LIMIT = 6  # summarize's daily limit
QUOTA = 4  # QUOTA_KEY's daily quota on translate
# Short inputs and answers: the engine is a 135M model on 2 shared CPU cores.
SUMMARIZE = {"text": "The team meeting moved to Friday because the room was booked.", "max_sentences": 1}
TRANSLATE = {"text": "Good morning.", "source_language": "en", "target_language": "fr"}
UNAVAILABLE = {"detail": "Service unavailable."}  # nginx's answer when the upstream failed (error_page)
# Failover: each client loop waits PACE between requests (4 loops stay under nginx's 10 r/s per key), and
# requests sent within GRACE of the kill may still meet it (nginx closes its idle connections to the dead
# server when it reads their end, not at the instant of the kill).
PACE, GRACE = 0.6, 1.0


@dataclass
class ApiServer:
    name: str
    port: int
    workers: int
    folder: Path
    env: dict[str, str]
    process: ServerProcess | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        output = self.folder / f"output-{self.starts}.log"
        with output.open("wb") as sink:
            popen = subprocess.Popen(
                [str(AI_PLATFORM), "serve", "--port", str(self.port), "--workers", str(self.workers)],
                env=self.env, cwd=self.folder, stdout=sink, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.process = ServerProcess(popen, self.port, output)
        self.process.wait_ready(self.workers, seconds=120)
        # Healthy once it has probed the engine (a remote engine is "loaded" when it answered /models).
        deadline = time.monotonic() + 60
        while httpx.get(f"{self.process.base_url}/health", timeout=10).json()["status"] != "healthy":
            assert time.monotonic() < deadline, self.output()
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.process.poll() is None:
            self.process.process.send_signal(signal.SIGTERM)
            try:
                self.process.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def output(self) -> str:
        return "" if self.process is None else self.process.output.read_text(errors="replace")[-3000:]

    def served(self) -> set[str]:
        """Request ids this server answered 200 to an operation, from its audit lines (logs/platform.log)."""
        log = self.folder / "logs" / "platform.log"
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        return {
            line.rpartition("request_id=")[2]
            for line in lines
            if " path=/operations/" in line and " status=200 " in line and "request_id=" in line
        }


@dataclass
class Layout:
    servers: list[ApiServer]
    database_url: str
    https_url: str
    ca: Path
    engine: RunningEngine
    key_ids: dict[str, str] = field(default_factory=dict)

    def client(self, **options: object) -> httpx.AsyncClient:
        context = ssl.create_default_context(cafile=str(self.ca))  # the certificate names 127.0.0.1
        return httpx.AsyncClient(base_url=self.https_url, verify=context, timeout=120, **options)  # type: ignore[arg-type]

    def get(self, path: str, key: str) -> httpx.Response:
        async def one() -> httpx.Response:
            async with self.client() as client:
                return await client.get(path, headers={"X-API-Key": key})

        return asyncio.run(one())

    def put(self, path: str, body: dict[str, object]) -> httpx.Response:
        async def one() -> httpx.Response:
            async with self.client() as client:
                return await client.put(path, json=body, headers=ADMIN)

        return asyncio.run(one())

    def key_usage(self, key: str, operation: str) -> dict[str, object]:
        response = self.get(f"/usage/keys?key_id={self.key_ids[key]}", ADMIN_KEY)
        assert response.status_code == 200, response.text
        return next(u for u in response.json()["usage"] if u["operation"] == operation)

    def open_reservations(self, key: str, operation: str) -> int:
        sql = f"SELECT COUNT(*) FROM reservation WHERE key_id = '{self.key_ids[key]}' AND operation = '{operation}'"
        return int(query(self.database_url, sql)[0][0])  # type: ignore[call-overload]


def engine_target(engine: RunningEngine, **options: str) -> str:
    query_string = "&".join(f"{k}={v}" for k, v in {"key_env": KEY_ENV, "timeout": "60", **options}.items())
    return f"openai+{engine.base_url}?{query_string}#{engine.model}"


def site_config(folder: Path, http_port: int, https_port: int, ports: list[int], crt: Path, key: Path) -> Path:
    """The deploy file with only its listen ports, API servers and certificate paths changed."""
    text = UPSTREAM_CONF.read_text()
    text = substitute(text, "    listen 80;\n", f"    listen 127.0.0.1:{http_port};\n")
    text = substitute(text, "    listen 443 ssl;\n", f"    listen 127.0.0.1:{https_port} ssl;\n")
    text = substitute(text, "    listen [::]:80;\n", "")  # no IPv6 in every CI container
    text = substitute(text, "    listen [::]:443 ssl;\n", "")
    for address, port in zip(("10.0.1.11:8000", "10.0.1.12:8000"), ports, strict=True):
        text = substitute(text, f"server {address} ", f"server 127.0.0.1:{port} ")
    text = substitute(text, "/etc/nginx/tls/ai-platform.crt", str(crt))
    text = substitute(text, "/etc/nginx/tls/ai-platform.key", str(key))
    site = folder / "ai-platform.conf"
    site.write_text(text)
    return site


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, platform_engine: RunningEngine) -> Iterator[Layout]:
    # Missing nginx, openssl or PostgreSQL: skip naming the package (fail where CI requires them), before
    # starting anything.
    distro_nginx_conf()
    bindir = pg_bindir()
    folder = tmp_path_factory.mktemp("scale-out")
    crt, key = self_signed_certificate(folder)
    # PostgreSQL runs as ``postgres`` when we are root: its folder must be its own (as the reliability suite's).
    pg_root = Path(tempfile.mkdtemp(prefix="ai-platform-pg-"))
    postgres = PostgresServer(bindir, pg_root)
    if os.geteuid() == 0:
        shutil.chown(pg_root, "postgres", "postgres")
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, pg_root, ignore_errors=True)
        postgres.init()
        postgres.start()
        stack.callback(postgres.stop)
        database_url = postgres.new_database()

        # classify: choose=logprobs (the default), from the engine's /v1 top_logprobs
        models = {op: engine_target(platform_engine) for op in ("summarize", "translate", "classify")}
        servers = []
        for name, workers in (("a", 2), ("b", 1)):
            server_folder = folder / f"server-{name}"
            server_folder.mkdir()
            # The same SECRET_KEY, keys, database and engines on every API server (platform_env's SECRET_KEY).
            settings = platform_env(
                server_folder,
                DATABASE_URL=database_url,
                VALID_API_KEYS=json.dumps([CLIENT_KEY, QUOTA_KEY, FAILOVER_KEY]),
                OPERATION_MODEL_MAP=json.dumps(models),
                ENABLED_PLUGINS="summarize,translate,classify",
            )
            del settings["DEFAULT_MODEL"]
            inherited = {k: v for k, v in os.environ.items() if k not in settings}
            env = {**inherited, **settings, KEY_ENV: platform_engine.api_key}
            servers.append(ApiServer(name, free_port(), workers, server_folder, env))
        for server in servers:
            stack.callback(server.stop)
            server.start()

        http_port, https_port = free_port(), free_port()
        site = site_config(folder, http_port, https_port, [s.port for s in servers], crt, key)
        stack.enter_context(running_nginx(main_config(folder, site), https_port))
        layout = Layout(servers, database_url, f"https://127.0.0.1:{https_port}", crt, platform_engine)
        for client_key in (CLIENT_KEY, QUOTA_KEY, FAILOVER_KEY):
            response = layout.get("/usage/keys/me", client_key)
            assert response.status_code == 200, response.text
            layout.key_ids[client_key] = response.json()["usage"][0]["key_id"]
        yield layout


def post_all(layout: Layout, requests: list[tuple[str, dict[str, object], str]]) -> list[httpx.Response]:
    """Send every (operation, body, key) at once through nginx."""

    async def burst() -> list[httpx.Response]:
        async with layout.client(limits=httpx.Limits(max_connections=len(requests))) as client:
            return await asyncio.gather(
                *(client.post(f"/operations/{op}", json=body, headers={"X-API-Key": key}) for op, body, key in requests)
            )

    return asyncio.run(burst())


def test_limits_and_quotas_are_exact_across_api_servers_behind_nginx(layout: Layout) -> None:
    assert layout.put("/limits", {"operation": "summarize", "daily_limit": LIMIT}).status_code == 200
    quota = {"key_id": layout.key_ids[QUOTA_KEY], "operation": "translate", "daily_limit": QUOTA}
    assert layout.put("/quotas", quota).status_code == 200

    # 30 requests at once (below nginx's per-address burst of 40 and per-key burst of 20, which are not
    # under test here): 14 against the daily limit, 12 against one key's quota, 4 of another key beside it.
    requests = [("summarize", {**SUMMARIZE, "request_id": f"limit-{i}"}, CLIENT_KEY) for i in range(14)]
    requests += [("translate", {**TRANSLATE, "request_id": f"quota-{i}"}, QUOTA_KEY) for i in range(12)]
    requests += [("translate", {**TRANSLATE, "request_id": f"free-{i}"}, CLIENT_KEY) for i in range(4)]
    responses = post_all(layout, requests)
    limited, quota_limited, free = responses[:14], responses[14:26], responses[26:]

    for group, allowed, refusal in (
        (limited, LIMIT, "Daily limit exceeded for operation 'summarize'"),
        (quota_limited, QUOTA, "Daily quota exceeded for this API key on operation 'translate'"),
    ):
        assert Counter(r.status_code for r in group) == {200: allowed, 429: len(group) - allowed}, [
            (r.status_code, r.text) for r in group
        ]
        # The app's 429s (not nginx's "Too many requests."), each admission seeing its own count.
        assert all(r.json()["detail"].startswith(refusal) for r in group if r.status_code == 429)
        remaining = sorted(int(r.headers["X-RateLimit-Remaining"]) for r in group if r.status_code == 200)
        assert remaining == list(range(allowed))
    assert [r.status_code for r in free] == [200] * len(free), [r.text for r in free]

    # The usage rows equal the 200s: through the API, and in PostgreSQL itself.
    usage = {u["operation"]: u for u in layout.get("/limits/usage", ADMIN_KEY).json()["usage"]}
    assert (usage["summarize"]["request_count"], usage["summarize"]["remaining"]) == (LIMIT, 0)
    assert usage["summarize"]["total_tokens"] == sum(r.json()["meta"]["output_tokens"] for r in limited if r.is_success)
    assert usage["translate"]["request_count"] == QUOTA + len(free)
    assert layout.key_usage(QUOTA_KEY, "translate")["request_count"] == QUOTA
    assert layout.key_usage(CLIENT_KEY, "translate")["request_count"] == len(free)
    counts = dict(query(layout.database_url, "SELECT operation, request_count FROM daily_usage"))  # type: ignore[arg-type]
    assert counts == {"summarize": LIMIT, "translate": QUOTA + len(free)}
    assert query(layout.database_url, "SELECT COUNT(*) FROM reservation") == [(0,)]

    # Both API servers served some of them: the limits were shared, not kept per server.
    answered = {r.json()["meta"]["request_id"] for r in responses if r.is_success}
    deadline = time.monotonic() + 10
    while (served := [s.served() & answered for s in layout.servers]) and sum(map(len, served)) < len(answered):
        assert time.monotonic() < deadline, served
        time.sleep(0.1)
    assert all(served), served
    assert set.union(*served) == answered


@dataclass
class Sent:
    request_id: str
    started: float
    ended: float
    status: int
    body: dict[str, object]


def test_failover_when_an_api_server_is_killed(layout: Layout) -> None:
    """SIGKILL the 2-worker server while requests run through nginx; the other takes over, nothing counted twice."""
    victim, survivor = layout.servers
    assert victim.process is not None and survivor.process is not None
    sent: list[Sent] = []
    killed_at: list[float] = []
    loops, before_kill, after_kill = 4, 6, 12

    async def loop(client: httpx.AsyncClient, number: int) -> None:
        for i in range(100):
            if killed_at and sum(s.started > killed_at[0] + GRACE for s in sent) >= after_kill:
                return
            request_id = f"failover-{number}-{i}"
            started = time.monotonic()
            response = await client.post(
                "/operations/translate",
                json={**TRANSLATE, "request_id": request_id},
                headers={"X-API-Key": FAILOVER_KEY},
            )
            sent.append(Sent(request_id, started, time.monotonic(), response.status_code, response.json()))
            await asyncio.sleep(PACE)

    async def kill_midway() -> None:
        while len(sent) < before_kill:
            await asyncio.sleep(0.02)
        assert victim.process is not None
        # Taken before the signal: a request the kill fails can end (nginx's 503) before the kill call returns.
        moment = time.monotonic()
        await asyncio.to_thread(victim.process.kill)  # every worker, then the supervisor: the machine is gone
        killed_at.append(moment)

    async def run() -> None:
        async with layout.client(limits=httpx.Limits(max_connections=loops)) as client:
            await asyncio.gather(kill_midway(), *(loop(client, n) for n in range(loops)))

    asyncio.run(run())
    assert victim.process.process.poll() is not None
    kill = killed_at[0]
    answered = [s for s in sent if s.status == 200]
    lost = [s for s in sent if s.status != 200]
    # A request fails only if it was in flight when its server died (nginx: "upstream prematurely closed");
    # it gets nginx's 503, never a 200 from a second try. Everything sent after the kill is answered.
    for s in lost:
        assert (s.status, s.body) == (503, UNAVAILABLE), s
        assert s.started < kill + GRACE and kill < s.ended, s
    after = [s for s in sent if s.started > kill + GRACE]
    assert len(after) >= after_kill and all(s.status == 200 for s in after), after
    served_after = {s.request_id for s in after}
    deadline = time.monotonic() + 10
    while not served_after <= survivor.served():
        assert time.monotonic() < deadline, served_after - survivor.served()
        time.sleep(0.1)

    # Each request id reached an API server at most once: nginx never resent a POST.
    repeated = query(
        layout.database_url,
        "SELECT request_id, COUNT(*) FROM audit_record WHERE request_id LIKE 'failover-%' "
        "GROUP BY request_id HAVING COUNT(*) > 1",
    )
    assert repeated == []

    # The counting invariant (module docstring), before and after the dead processes' reservations come back.
    count = int(layout.key_usage(FAILOVER_KEY, "translate")["request_count"])  # type: ignore[call-overload]
    open_ = layout.open_reservations(FAILOVER_KEY, "translate")
    counted = count - open_
    assert len(answered) <= counted <= count <= len(answered) + len(lost), (len(answered), counted, count, len(lost))

    victim.start()  # the same host: its workers give back what the dead processes held (recover)
    assert layout.open_reservations(FAILOVER_KEY, "translate") == 0
    after_restart = int(layout.key_usage(FAILOVER_KEY, "translate")["request_count"])  # type: ignore[call-overload]
    assert after_restart == counted

    # nginx tries the restarted server again after fail_timeout (10 s), and it serves.
    deadline = time.monotonic() + 30
    for i in range(1000):
        response = post_all(layout, [("translate", {**TRANSLATE, "request_id": f"back-{i}"}, CLIENT_KEY)])[0]
        assert response.status_code == 200, response.text
        if f"back-{i}" in victim.served():
            break
        assert time.monotonic() < deadline, "nginx never sent a request to the restarted server"
        time.sleep(0.5)
    print(f"failover: {len(answered)} answered, {len(lost)} lost in flight, counted {counted}, reserved {open_}")
