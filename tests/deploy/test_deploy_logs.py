"""Logs: one line per request in the rotating file (and on the console, i.e. journald), never a key or text."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from deploy_harness import free_port, plain_request, running_server, wait_until
from litestar.testing import AsyncTestClient

from ai_platform.app import create_app
from ai_platform.logging_config import SharedRotatingFileHandler, logging_config
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine, platform_env
from log_checks import FORGED_LINE, FORGING_PATHS, assert_one_record_per_line, audit_lines
from support import ADMIN_KEY, CLIENT_KEY, KEY, SEED_MODELS, SUMMARIZE

pytestmark = pytest.mark.anyio

LINE = re.compile(
    r"^(?P<timestamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO ai_platform\.audit: request method=POST "
    r"path=/operations/summarize operation=summarize key_id=(?P<key_id>[0-9a-f]{16}) status=(?P<status>\d+) "
    r"duration_ms=(?P<duration>\d+\.\d) tokens=(?P<tokens>\d+) request_id=(?P<request_id>\S+)$"
)


async def test_one_structured_line_per_request_without_secrets_or_text(env: dict[str, str]) -> None:
    app = create_app(Settings.from_mapping(env), engine=FakeEngine(models=dict(SEED_MODELS)))
    async with AsyncTestClient(app) as client:
        assert (await client.post("/operations/summarize", json=SUMMARIZE, headers=KEY)).status_code == 200
        assert (await client.post("/operations/summarize", json={"text": ""}, headers=KEY)).status_code == 422
    log_file = Path(env["LOG_DIR"]) / "platform.log"
    text = log_file.read_text()
    lines = [m for m in map(LINE.match, text.splitlines()) if m]
    assert [(m["status"], m["request_id"]) for m in lines] == [("200", "req-001"), ("422", "-")]
    served = lines[0]
    assert int(served["tokens"]) > 0 and float(served["duration"]) >= 0
    assert served["key_id"] == lines[1]["key_id"]  # stable per key, so usage can be traced to a client
    for secret in (CLIENT_KEY, ADMIN_KEY, env["SECRET_KEY"], SUMMARIZE["text"], "Artificial intelligence"):
        assert str(secret) not in text


def test_log_file_rotates_and_console_is_kept_for_journald(env: dict[str, str]) -> None:
    config = create_app(Settings.from_mapping(env), engine=FakeEngine()).logging_config
    handlers = config.handlers  # type: ignore[union-attr]
    assert handlers["file"]["class"] == "ai_platform.logging_config.SharedRotatingFileHandler"
    assert (handlers["file"]["maxBytes"], handlers["file"]["backupCount"]) == (10 * 1024 * 1024, 5)
    assert handlers["console"]["class"] == "logging.StreamHandler"
    settings = Settings.from_mapping({**env, "LOG_MAX_BYTES": "4096", "LOG_BACKUP_COUNT": "9"})
    handlers = create_app(settings, engine=FakeEngine()).logging_config.handlers  # type: ignore[union-attr]
    assert (handlers["file"]["maxBytes"], handlers["file"]["backupCount"]) == (4096, 9)


# One writer process: the app's own logging configuration, then LINES lines once the start file exists.
WRITER = """
import logging, sys, time
from pathlib import Path
from ai_platform.logging_config import logging_config
folder, writer, lines, start, max_bytes = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), int(sys.argv[5])
logging_config("INFO", folder, max_bytes=max_bytes, backup_count=1000).configure()
log = logging.getLogger("ai_platform.rotation")
while not start.exists():
    time.sleep(0.001)
for line in range(lines):
    log.info("writer=%d line=%05d %s", writer, line, "x" * (20 + line * 7 % 60))
"""
WRITTEN = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ai_platform\.rotation: writer=(\d+) line=(\d{5}) (x+)$"
)


def test_workers_sharing_the_log_file_rotate_it_without_losing_or_breaking_a_line(tmp_path: Path) -> None:
    """Several processes (as ``serve --workers``) write platform.log at once through ~50 rotations."""
    writers, lines, max_bytes = 4, 400, 4096
    folder, start = tmp_path / "logs", tmp_path / "start"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(folder), str(w), str(lines), str(start), str(max_bytes)],
            stderr=subprocess.DEVNULL,  # the console handler's copy
        )
        for w in range(writers)
    ]
    time.sleep(1.5)  # let them all import and configure logging, then start them together
    start.touch()
    assert [p.wait(timeout=120) for p in processes] == [0] * writers

    backups = sorted(folder.glob("platform.log.*[0-9]"), key=lambda f: -int(f.suffix[1:]))
    files = [*backups, folder / "platform.log"]
    assert len(files) > 20  # it did rotate, many times, and deleted no backup (1000 kept)
    assert [int(f.suffix[1:]) for f in files[:-1]] == list(range(len(files) - 1, 0, -1))  # .N … .1, no gap
    seen: dict[int, list[int]] = {w: [] for w in range(writers)}
    for file in files:  # oldest first
        assert file.stat().st_size <= max_bytes, file
        for text in file.read_text().splitlines():
            match = WRITTEN.match(text)
            assert match, f"broken line in {file.name}: {text!r}"
            writer, line, padding = int(match[1]), int(match[2]), match[3]
            assert len(padding) == 20 + line * 7 % 60, text  # whole: nothing cut or mixed in
            seen[writer].append(line)
    # Every line of every writer, once, in the order it was written: none lost, none duplicated.
    assert seen == {w: list(range(lines)) for w in range(writers)}


def test_with_rotation_off_the_file_follows_an_external_rotation(tmp_path: Path) -> None:
    """``LOG_MAX_BYTES=0`` for logrotate (``create`` mode): after its rename, lines go to the new file."""
    handler = SharedRotatingFileHandler(tmp_path / "platform.log", maxBytes=0, backupCount=5, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        for line in ("one", "two" * 5000, "three"):
            handler.handle(logging.makeLogRecord({"msg": line}))
            if line == "one":
                (tmp_path / "platform.log").rename(tmp_path / "platform.log.1")  # what logrotate does
    finally:
        handler.close()
    assert (tmp_path / "platform.log.1").read_text() == "one\n"
    assert (tmp_path / "platform.log").read_text() == "two" * 5000 + "\nthree\n"  # never rotated by size


# Issue 11, items 5 and 7: one record is one line whatever a client sends, and no query string in the log.


def test_every_logger_writes_one_line_per_record_with_tracebacks_indented(tmp_path: Path) -> None:
    """The app's loggers, Litestar's and uvicorn's all go through the same escaping formatter."""
    logging_config("INFO", tmp_path).configure()
    hostile = "x\n" + FORGED_LINE + "\r\x1b[2J\x85\u2028\u202e\\n"
    for name in ("ai_platform.audit", "litestar", "uvicorn.error", "some.library"):
        logging.getLogger(name).warning("value=%s", hostile)
    try:
        raise ValueError(hostile)
    except ValueError:
        logging.getLogger("ai_platform.services").exception("failed: %s", hostile)
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", f"/limits?api_key={CLIENT_KEY}&x=1", "1.1", 403
    )
    logging.getLogger("uvicorn.error").info('%s - "WebSocket %s" 403', "127.0.0.1:5001", f"/ws?token={CLIENT_KEY}")
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = (tmp_path / "platform.log").read_bytes()
    lines = assert_one_record_per_line(text)
    escaped = "x\\n" + FORGED_LINE + "\\r\\x1b[2J\\x85\\u2028\\u202e\\\\n"  # reversible: the backslash too
    assert [line.split(": ", 1)[1] for line in lines[:4]] == [f"value={escaped}"] * 4
    assert lines[4].endswith(f"ERROR ai_platform.services: failed: {escaped}")
    # A traceback is the one thing on further lines: each of them indented (a record starts at column 0), and
    # escaped but for the line breaks of the exception's message, which Python formats as lines of their own.
    assert lines[5] == "  Traceback (most recent call last):"
    assert lines[-4:-2] == ["  ValueError: x", "  " + escaped.removeprefix("x\\n")]
    assert lines[-2].endswith('INFO uvicorn.access: 127.0.0.1:5000 - "GET /limits?[redacted] HTTP/1.1" 403')
    assert lines[-1].endswith('INFO uvicorn.error: 127.0.0.1:5001 - "WebSocket /ws?[redacted]" 403')
    assert CLIENT_KEY.encode() not in text


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[tuple[int, Path]]:
    """The real ``ai-platform serve`` (uvicorn, its logging as the command sets it up), on the tiny model."""
    folder = tmp_path_factory.mktemp("served")
    models = folder / "models"
    models.mkdir()
    (models / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    env = platform_env(
        folder, MODELS_DIR=str(models), DEFAULT_MODEL="tiny", OPERATION_MODEL_MAP="{}", ENABLED_PLUGINS="summarize"
    )
    port = free_port()
    with running_server(env, folder, port, console=folder / "console.log"):
        yield port, folder


@pytest.mark.slow
def test_real_server_logs_neither_forged_lines_nor_query_strings(served: tuple[int, Path]) -> None:
    port, folder = served
    requests = [("POST", path, {}) for path in FORGING_PATHS]
    requests += [
        ("GET", f"/limits?api_key={CLIENT_KEY}", {}),  # a key in the query string: refused, and never logged
        ("GET", f"/limits?x=%0a{quote(FORGED_LINE)}&token={ADMIN_KEY}", KEY),
        ("GET", "/", {}),
        ("TRACE", "/health", {}),  # nginx refuses TRACE itself: only here does it reach the app
        ("PATCH", "/limits", KEY),
    ]
    statuses = [plain_request(port, method, target, headers) for method, target, headers in requests]
    assert statuses[len(FORGING_PATHS) :] == [403, 200, 404, 405, 405]
    log_file, console = folder / "logs" / "platform.log", folder / "console.log"
    for output in (log_file, console):  # the file, and the console that journald keeps
        # The access line is written as the response starts, the audit line once it is sent.
        wait_until(lambda: output.read_text().count(" ai_platform.audit: request ") >= len(requests), "audit lines")  # noqa: B023
        text = output.read_bytes()
        lines = assert_one_record_per_line(text)
        for secret in (CLIENT_KEY, ADMIN_KEY):
            assert secret.encode() not in text, output
        audit = audit_lines(lines)
        assert [(m["method"], unquote(m["path"]), int(m["status"])) for m in audit] == [
            (method, unquote(target.partition("?")[0]), status)
            for (method, target, _), status in zip(requests, statuses, strict=True)
        ]
        access = [line.split('"')[1] for line in lines if " INFO uvicorn.access: " in line]
        assert access[len(FORGING_PATHS) :] == [
            "GET /limits?[redacted] HTTP/1.1",
            "GET /limits?[redacted] HTTP/1.1",
            "GET / HTTP/1.1",
            "TRACE /health HTTP/1.1",
            "PATCH /limits HTTP/1.1",
        ]
