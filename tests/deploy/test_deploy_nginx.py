"""deploy/nginx/ai-platform.conf checked by nginx itself, then serving the API in front of a real server.

The config under test is the deploy file with only its ports, upstream port and certificate paths
changed (each substitution must match exactly once), included from the distribution's own
/etc/nginx/nginx.conf as sites-enabled/ would include it, its logs in the test's folder.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from deploy_harness import (
    NGINX_CONF,
    Https,
    free_port,
    main_config,
    nginx_test,
    running_nginx,
    running_server,
    self_signed_certificate,
    substitute,
    wait_until,
)

from log_checks import FORGED_LINE, FORGING_PATHS, UNSAFE_BYTES, assert_one_record_per_line, audit_lines
from support import ADMIN_KEY, CLASSIFY, CLIENT_KEY, SEED_MODELS, SUMMARIZE, TRANSLATE, assert_meta

pytestmark = [pytest.mark.slow, pytest.mark.deploy]
NGINX_UPSTREAM_CONF = NGINX_CONF.with_name("ai-platform-upstream.conf")  # several API servers

KEY = {"X-API-Key": CLIENT_KEY}
ADMIN = {"X-API-Key": ADMIN_KEY}
SECURITY_HEADERS = {
    "strict-transport-security": "max-age=31536000",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
}


@dataclass
class Stack:
    https_port: int
    http_port: int
    app_port: int
    ca: Path
    clients: list[Https]
    folder: Path  # logs/platform.log, console.log (the app's), access.log (nginx's), usage.sqlite3

    def client(self) -> Https:
        client = Https(self.https_port, self.ca)
        self.clients.append(client)
        return client


def site_config(folder: Path, http_port: int, https_port: int, app_port: int, crt: Path, key: Path) -> Path:
    text = NGINX_CONF.read_text()
    text = substitute(text, "    listen 80;\n", f"    listen 127.0.0.1:{http_port};\n")
    text = substitute(text, "    listen 443 ssl;\n", f"    listen 127.0.0.1:{https_port} ssl;\n")
    # No IPv6 in every CI container.
    text = substitute(text, "    listen [::]:80;\n", "")
    text = substitute(text, "    listen [::]:443 ssl;\n", "")
    text = substitute(text, "server 127.0.0.1:8000;", f"server 127.0.0.1:{app_port};")
    text = substitute(text, "/etc/nginx/tls/ai-platform.crt", str(crt))
    text = substitute(text, "/etc/nginx/tls/ai-platform.key", str(key))
    site = folder / "ai-platform.conf"
    site.write_text(text)
    return site


def test_nginx_accepts_the_deploy_file_without_warnings(tmp_path: Path) -> None:
    crt, key = self_signed_certificate(tmp_path)
    text = NGINX_CONF.read_text()
    text = substitute(text, "/etc/nginx/tls/ai-platform.crt", str(crt))
    text = substitute(text, "/etc/nginx/tls/ai-platform.key", str(key))
    (tmp_path / "ai-platform.conf").write_text(text)
    result = nginx_test(main_config(tmp_path, tmp_path / "ai-platform.conf"))
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
    assert "[warn]" not in result.stderr and "[emerg]" not in result.stderr, result.stderr


def test_nginx_accepts_the_scale_out_file_without_warnings(tmp_path: Path) -> None:
    """deploy/nginx/ai-platform-upstream.conf: several API servers (served in tests/remote/test_scale_out_layout.py)."""
    crt, key = self_signed_certificate(tmp_path)
    text = NGINX_UPSTREAM_CONF.read_text()
    text = substitute(text, "/etc/nginx/tls/ai-platform.crt", str(crt))
    text = substitute(text, "/etc/nginx/tls/ai-platform.key", str(key))
    (tmp_path / "ai-platform.conf").write_text(text)
    result = nginx_test(main_config(tmp_path, tmp_path / "ai-platform.conf"))
    assert result.returncode == 0, result.stderr
    assert "[warn]" not in result.stderr and "[emerg]" not in result.stderr, result.stderr


def test_the_scale_out_file_is_the_site_with_another_upstream() -> None:
    """One site, two upstreams: the scale-out file may differ from ai-platform.conf only in its opening
    comment, its ``upstream`` block (and the comment above it) and its failover lines, so that a change to
    one (a header, a limit, a timeout) cannot be forgotten in the other."""

    def site(text: str) -> str:
        text = re.sub(r"\A(?:#.*\n)+\n", "", text)  # the opening comment
        text = re.sub(r"(?m)(?:^#.*\n)*^upstream ai_platform \{\n(?:^    .*\n)*^\}\n", "upstream\n", text)
        return re.sub(r"(?m)(?:^    #.*\n)*(?:^    proxy_next_upstream.*\n)+", "", text)

    single, scale_out = NGINX_CONF.read_text(), NGINX_UPSTREAM_CONF.read_text()
    assert site(scale_out) == site(single)
    assert re.findall(r"(?m)^    server (\S+) max_fails=1 fail_timeout=10s;$", scale_out) == [
        "10.0.1.11:8000",
        "10.0.1.12:8000",
    ]
    assert re.findall(r"(?m)^    (proxy_next_upstream .*);$", scale_out) == ["proxy_next_upstream error timeout"]
    assert "non_idempotent" not in re.sub(r"(?m)^\s*#.*$", "", scale_out)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("nginx")
    models = folder / "models"
    models.mkdir()
    for model in SEED_MODELS.values():
        (models / model).symlink_to(tiny_model_dir, target_is_directory=True)
    env = {
        "SECRET_KEY": "test-secret-key-0123456789",
        "VALID_API_KEYS": f'["{CLIENT_KEY}"]',
        "ADMIN_API_KEYS": f'["{ADMIN_KEY}"]',
        "DATABASE_URL": f"sqlite://{folder / 'usage.sqlite3'}",
        "LOG_DIR": str(folder / "logs"),
        "MODELS_DIR": str(models),
        "METRICS_ACCESS": "loopback",
        "ENABLED_PLUGINS": "summarize,translate,classify",  # the seed's operations, whatever else is installed
    }
    crt, key = self_signed_certificate(folder)
    app_port, http_port, https_port = free_port(), free_port(), free_port()
    config = main_config(folder, site_config(folder, http_port, https_port, app_port, crt, key))
    with running_server(env, folder, app_port, console=folder / "console.log"), running_nginx(config, https_port):
        yield Stack(https_port, http_port, app_port, crt, [], folder)


@pytest.fixture(autouse=True)
def close_clients(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "stack" in request.fixturenames:
        stack: Stack = request.getfixturevalue("stack")
        while stack.clients:
            stack.clients.pop().close()


def test_contract_requests_through_nginx(stack: Stack) -> None:
    client = stack.client()
    status, headers, body = client.request("GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "healthy"
    for name, value in SECURITY_HEADERS.items():
        assert headers[name] == value
    assert "server" not in headers or headers["server"] == "nginx"  # no version
    for operation, request in {"summarize": SUMMARIZE, "translate": TRANSLATE, "classify": CLASSIFY}.items():
        status, response = client.json("POST", f"/operations/{operation}", request, KEY)
        assert status == 200, response
        assert_meta(response["meta"], operation, request)  # type: ignore[index]
    status, usage = client.json("GET", "/limits/usage", headers=KEY)
    assert status == 200 and {u["request_count"] for u in usage["usage"]} == {1}  # type: ignore[index]
    status, limits = client.json("GET", "/limits", headers=KEY)
    assert status == 200 and len(limits["limits"]) == 3  # type: ignore[index]
    # The app's own errors pass through unchanged.
    assert client.json("POST", "/operations/summarize", {"text": ""}, KEY) == (
        422,
        {"error": "Request validation failed.", "detail": [
            {"type": "string_too_short", "loc": ["body", "text"], "msg": "String should have at least 1 character",
             "input": ""}]},
    )  # fmt: skip
    assert client.json("GET", "/limits") == (403, {"detail": "Invalid or missing API key."})


def test_plain_http_redirects_to_https(stack: Stack) -> None:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", stack.http_port, timeout=10)
    connection.request("GET", "/limits?x=1", headers={"Host": "ai-platform.local"})
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 301
    assert response.getheader("Location") == "https://ai-platform.local/limits?x=1"


def test_body_limit_refuses_oversized_bodies_in_nginx(stack: Stack) -> None:
    client = stack.client()
    # The largest valid body (8000 astral characters as JSON surrogate pairs, 96 KB) gets through
    # to the app, which answers it (here 422 for max_sentences, without running the model).
    largest = json.dumps({"text": "\U0001f600" * 8000, "max_sentences": 0}).encode()
    assert 96_000 < len(largest) < 128 * 1024
    status, _, body = client.request("POST", "/operations/summarize", headers=KEY, raw=largest)
    assert status == 422 and json.loads(body)["detail"][0]["loc"] == ["body", "max_sentences"]
    status, headers, body = stack.client().request(
        "POST", "/operations/summarize", headers=KEY, raw=b'{"text": "' + b"a" * (128 * 1024) + b'"}'
    )
    assert (status, json.loads(body)) == (413, {"detail": "Request body too large."})
    assert headers["x-content-type-options"] == "nosniff"


def test_metrics_only_for_this_host_through_nginx(stack: Stack) -> None:
    client = stack.client()
    status, _, body = client.request("GET", "/metrics")  # METRICS_ACCESS=loopback: no key
    text = body.decode()
    assert status == 200
    for series in (
        "ai_platform_requests_total",
        "ai_platform_request_duration_seconds_bucket",
        "ai_platform_generated_tokens_total",
        "ai_platform_limit_rejections_total",
        "ai_platform_queue_depth",
        "ai_platform_model_loaded",
    ):
        assert f"\n{series}{{" in text, series
    assert 'ai_platform_model_loaded{model="qwen-summarize",operation="summarize"} 1.0' in text
    # A remote client (as nginx reports it in X-Forwarded-For) is refused by the app.
    status, _, body = client.request("GET", "/metrics", headers={"X-Forwarded-For": "203.0.113.7"})
    assert status == 403 and json.loads(body) == {"detail": "Metrics are only served to clients on this host."}


def test_every_request_is_audited_and_logged_on_one_line_through_nginx(stack: Stack) -> None:
    """Issue 11: forged log lines in the path, unmatched paths and methods, a key in the query string."""
    client = stack.client()
    requests = [("POST", path, {}) for path in FORGING_PATHS]
    requests += [
        ("GET", "/", {"User-Agent": 'evil" 200 0 "-" "\u00e9'}),  # nginx logs the header, escaped
        ("PATCH", "/limits", KEY),
        ("GET", "/operations/summarize", KEY),
        ("GET", f"/limits?api_key={CLIENT_KEY}&next=%0a{quote(FORGED_LINE)}", {}),
        ("HEAD", "/health", {}),  # 405, or 200 once /health answers HEAD: either way, audited
    ]
    statuses = [client.request(method, target, headers=headers)[0] for method, target, headers in requests]
    assert statuses[len(FORGING_PATHS) : -1] == [404, 405, 405, 403]
    assert set(statuses[: len(FORGING_PATHS)]) <= {403, 404}

    expected = [
        (method, unquote(target.partition("?")[0]), status)
        for (method, target, _), status in zip(requests, statuses, strict=True)
    ]
    log_file, console = stack.folder / "logs" / "platform.log", stack.folder / "console.log"
    for output in (log_file, console):  # the app's file, and its console (journald's copy)
        lines: list[str] = []

        def logged(output: Path = output) -> bool:
            nonlocal lines
            lines = assert_one_record_per_line(output.read_bytes())
            found = [(m["method"], unquote(m["path"]), int(m["status"])) for m in audit_lines(lines)]
            return found[-len(expected) :] == expected

        wait_until(logged, f"the audit lines in {output.name}")
        assert not any(CLIENT_KEY in line for line in lines)
        assert any('"GET /limits?[redacted] HTTP/1.1" 403' in line for line in lines)  # uvicorn's access line

    # The audit rows: the same escaped paths as the lines, 404 and 405 included.
    database = sqlite3.connect(stack.folder / "usage.sqlite3")
    try:

        def rows() -> list[tuple[str, str, int]]:
            found = database.execute("SELECT method, path, status FROM audit_record ORDER BY id").fetchall()
            return [(method, unquote(path), status) for method, path, status in found[-len(expected) :]]

        wait_until(lambda: rows() == expected, "the audit rows")
    finally:
        database.close()

    # nginx's own access log: one line per request, no query string, client values escaped.
    access = (stack.folder / "access.log").read_bytes()
    assert CLIENT_KEY.encode() not in access
    access_lines = assert_nginx_lines(access)
    assert any('"GET /limits?[redacted] HTTP/1.1" 403 ' in line for line in access_lines)
    assert any(
        '"GET / HTTP/1.1" 404 ' in line and line.endswith('"evil\\x22 200 0 \\x22-\\x22 \\x22\\xE9"')
        for line in access_lines
    )
    assert any(f'"POST {FORGING_PATHS[0]} HTTP/1.1" ' in line for line in access_lines)


def assert_nginx_lines(log: bytes) -> list[str]:
    unsafe = UNSAFE_BYTES.search(log)
    assert unsafe is None, log[max(unsafe.start() - 200, 0) : unsafe.end() + 50]
    lines = log.decode().split("\n")
    assert lines[-1] == ""
    for line in lines[:-1]:
        assert line.startswith("127.0.0.1 - - ["), line
    return lines[:-1]


def test_rate_limit_stops_key_guessing_by_address(stack: Stack) -> None:
    time.sleep(3)  # let the buckets of earlier tests drain
    client = stack.client()
    statuses = []
    for attempt in range(100):
        status, _, body = client.request("GET", "/limits", headers={"X-API-Key": f"guess-{attempt:04d}"})
        statuses.append(status)
        if status == 429:
            assert json.loads(body) == {"detail": "Too many requests."}
    assert set(statuses) == {403, 429}
    assert statuses.count(429) >= 40, statuses  # 20 r/s with a burst of 40: most guesses never reach the app
    assert statuses[:20] == [403] * 20


def test_rate_limit_per_key_leaves_other_keys_alone(stack: Stack) -> None:
    time.sleep(3)
    client = stack.client()
    statuses = [client.request("GET", "/limits", headers=KEY)[0] for _ in range(30)]
    assert statuses[:15] == [200] * 15 and 429 in statuses, statuses  # 10 r/s with a burst of 20
    assert client.request("GET", "/limits", headers=ADMIN)[0] == 200
