"""Logs: one line per request in the rotating file (and on the console, i.e. journald), never a key or text."""

from __future__ import annotations

import logging.handlers
import re
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from ai_platform.app import create_app
from ai_platform.settings import Settings
from ai_platform.testing import FakeEngine
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
    assert handlers["file"]["class"] == "logging.handlers.RotatingFileHandler"
    assert (handlers["file"]["maxBytes"], handlers["file"]["backupCount"]) == (10 * 1024 * 1024, 5)
    assert handlers["console"]["class"] == "logging.StreamHandler"
    assert logging.handlers.RotatingFileHandler  # the class the file handler names exists
