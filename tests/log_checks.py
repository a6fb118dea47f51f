"""Checks of what the server writes to its log (platform.log, the console) against forged lines and leaked secrets.

Issue 11: a client without a key put whole ``ai_platform.audit`` lines into the log through a
percent-encoded line feed in the path, and terminal escapes through ``%1b``; a key sent in the
query string reached the access log.
"""

from __future__ import annotations

import re
from urllib.parse import quote

# A whole audit line, as a client would smuggle it into the path after a line break.
FORGED_LINE = (
    "2026-12-01 03:00:00,000 INFO ai_platform.audit: request method=POST path=/operations/summarize "
    "operation=summarize key_id=0123456789abcdef status=200 duration_ms=1.0 tokens=1 request_id=forged"
)
# Paths (as sent, percent-encoded) with the forged line after LF, CR LF, CR, NEL and U+2028, a terminal escape
# (clear screen, set the window title) and a bidi override, against a route (/operations/x) and no route (/nope).
FORGING_PATHS = [
    "/operations/x" + quote("\n" + FORGED_LINE),
    "/operations/x" + quote("\r\n" + FORGED_LINE),
    "/nope" + quote("\r" + FORGED_LINE),
    "/nope" + quote("\x85" + FORGED_LINE),
    "/nope" + quote("\u2028" + FORGED_LINE),
    "/operations/x%1b%5b2J%1b]0;pwned%07",
    "/nope" + quote("\u202e") + "gnp.exe",
]

RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
AUDIT_LINE = re.compile(
    r"^\S+ \S+ INFO ai_platform\.audit: request method=(?P<method>\S+) path=(?P<path>\S+) operation=\S+ "
    r"key_id=\S+ status=(?P<status>\d+) duration_ms=\d+\.\d tokens=\d+ request_id=\S+$"
)
# C0 controls but the line feed, DEL, C1 controls, U+2028/2029, the bidi embeddings/overrides/isolates (UTF-8).
UNSAFE_BYTES = re.compile(rb"[\x00-\x09\x0b-\x1f\x7f]|\xc2[\x80-\x9f]|\xe2\x80[\xa8-\xae]|\xe2\x81[\xa6-\xa9]")


def assert_one_record_per_line(log: bytes) -> list[str]:
    """No control character or line separator in ``log``; each line starts a record or continues a traceback."""
    unsafe = UNSAFE_BYTES.search(log)
    assert unsafe is None, log[max(unsafe.start() - 200, 0) : unsafe.end() + 50]
    lines = log.decode().split("\n")
    assert lines[-1] == "", lines[-1]
    for line in lines[:-1]:
        assert RECORD_START.match(line) or line.startswith("  "), line
        assert not line.startswith(FORGED_LINE[:23]), line
    return lines[:-1]


def audit_lines(lines: list[str]) -> list[re.Match[str]]:
    """The audit lines among ``lines``, each checked to have every field, none with a space in it."""
    found = [line for line in lines if " ai_platform.audit: request " in line]
    matches = [AUDIT_LINE.match(line) for line in found]
    assert all(matches), found
    return matches  # type: ignore[return-value]
