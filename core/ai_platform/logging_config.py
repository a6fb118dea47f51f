"""Logging: console (journald under systemd) plus a size-rotated file in ``LOG_DIR``.

Every worker process of ``ai-platform serve --workers N`` writes the same
``platform.log``. The standard ``RotatingFileHandler`` is unsafe there: each
process rotates on its own idea of the file's size, so at a rotation one process
renames the file while the others keep writing into the renamed one (or rotate it
again), and lines land in the wrong file, get overwritten or vanish with a deleted
backup. :class:`SharedRotatingFileHandler` is the same handler made safe across
processes, with the same files and settings, so nothing changes for an admin.

Every handler formats with :class:`SafeFormatter`: one record is one line, whatever a
client put into a logged value (a path with ``%0a``, a terminal escape), and query
strings never reach the log (an API key sent as ``?api_key=...``).
"""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import re
from pathlib import Path
from typing import Any, TextIO

from litestar.logging.config import LoggingConfig

LOG_FILE_NAME = "platform.log"
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUP_COUNT = 5


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED_QUERY = "?[redacted]"

# Whatever could end a line, or move or restyle a terminal's cursor, when printed: C0 controls (line feed,
# carriage return, escape …), DEL, C1 controls (NEL, CSI …), the Unicode line and paragraph separators, and
# the bidirectional overrides that reorder what a reader sees. The backslash too, so the escaping is reversible.
_UNSAFE = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028-\u202e\u2066-\u2069]")
_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return _NAMED.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape(text: str) -> str:
    """``text`` with every control character, line separator and backslash escaped (``\\n``, ``\\x1b``, ``\\u2028``)."""
    return _UNSAFE.sub(_escape_char, text)


def redact_query(path_with_query: str) -> str:
    """A request target without its query string: ``/limits?api_key=secret`` → ``/limits?[redacted]``."""
    path, mark, _ = path_with_query.partition("?")
    return path + REDACTED_QUERY if mark else path


class SafeFormatter(logging.Formatter):
    """A formatter that keeps every record on one line and keeps query strings out of the log.

    - The record's line (time, level, logger, message) has every control character and
      line separator escaped (:func:`escape`), so no value a client controls (a
      percent-decoded path, a header, a body field in an error message) can start a
      line of its own, forge another record or send escape sequences to a terminal.
    - A traceback or stack, the only text allowed on further lines, has each of its
      lines indented and escaped, so no continuation line can pass for a record either:
      every record starts at column 0 with its timestamp, and only it does.
    - uvicorn's access (and WebSocket) lines lose the request's query string
      (``?[redacted]``): clients put keys and tokens there, e.g. ``?api_key=...``.
    """

    def format(self, record: logging.LogRecord) -> str:
        record.message = self._message(record)
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = escape(self.formatMessage(record))
        # Not cached on the record (record.exc_text): another handler's formatter must not get our layout.
        if record.exc_info:
            text += self._block(self.formatException(record.exc_info))
        elif record.exc_text:
            text += self._block(record.exc_text)
        if record.stack_info:
            text += self._block(self.formatStack(record.stack_info))
        return text

    @staticmethod
    def _message(record: logging.LogRecord) -> str:
        args: Any = record.args
        if record.name.startswith("uvicorn.") and isinstance(args, tuple):
            # uvicorn's access lines, '%s - "%s %s HTTP/%s" %d' (and its WebSocket lines, on uvicorn.error),
            # take the request target, path and query string, as one argument.
            redacted = tuple(redact_query(a) if isinstance(a, str) and a.startswith("/") else a for a in args)
            if redacted != args:
                return str(record.msg) % redacted
        return record.getMessage()

    @staticmethod
    def _block(text: str) -> str:
        return "".join("\n  " + escape(line) for line in text.rstrip("\n").split("\n"))


class SharedRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A ``RotatingFileHandler`` that any number of processes may share (``platform.log``, ``.1`` … ``.N``).

    Each line is written under an exclusive ``flock`` on ``<file>.lock``, which every
    process using the file takes, and before writing it, still under the lock, the
    handler

    - reopens the file if it is no longer the one at the path (another process, or an
      external tool such as logrotate, renamed it), and
    - rotates it if the line would take it past ``maxBytes``: whichever process finds
      the file full rotates it, exactly once.

    So every line is written whole, once, into the current file, and no file grows
    past ``maxBytes`` (unless one line is longer). ``maxBytes=0`` never rotates: the
    file can then be rotated by logrotate (its default ``create`` mode, no
    ``copytruncate``), since every process follows the rename. The cost is a lock and
    two ``stat`` calls per line.
    """

    def __init__(
        self,
        filename: str | os.PathLike[str],
        mode: str = "a",
        maxBytes: int = 0,  # the standard handler's argument names, as dictConfig passes them
        backupCount: int = 0,
        encoding: str | None = None,
        delay: bool = False,
        errors: str | None = None,
    ) -> None:
        # Append mode always, opened lazily (under the lock, in emit).
        super().__init__(filename, "a", maxBytes, backupCount, encoding=encoding, delay=True, errors=errors)
        self._lock_fd: int | None = os.open(self.baseFilename + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + self.terminator
            size = len(text.encode(self.encoding or "utf-8", self.errors or "strict"))
            if self._lock_fd is None:
                return  # closed
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                stream = self._current_stream()
                if self._full(stream.fileno(), size):
                    self.doRollover()  # closes the stream; the next one is opened just below
                    stream = self._current_stream()
                stream.write(text)
                stream.flush()
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        except Exception:
            self.handleError(record)

    def _current_stream(self) -> TextIO:
        """The open file, reopened if the path now names another file (rotated by someone else)."""
        if self.stream is not None:
            try:
                at_path = os.stat(self.baseFilename)
            except FileNotFoundError:
                at_path = None
            ours = os.fstat(self.stream.fileno())
            if at_path is None or (at_path.st_dev, at_path.st_ino) != (ours.st_dev, ours.st_ino):
                self.stream.close()
                self.stream = None
        if self.stream is None:
            self.stream = self._open()
        return self.stream

    def _full(self, fd: int, incoming: int) -> bool:
        if self.maxBytes <= 0 or self.backupCount <= 0:
            return False
        size = os.fstat(fd).st_size
        return size > 0 and size + incoming > self.maxBytes

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        return False  # decided in emit, under the lock

    def close(self) -> None:
        self.acquire()
        try:
            super().close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
        finally:
            self.release()


def logging_config(
    level: str,
    log_dir: Path,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    backup_count: int = DEFAULT_BACKUP_COUNT,
) -> LoggingConfig:
    log_dir.mkdir(parents=True, exist_ok=True)
    return LoggingConfig(
        root={"level": level, "handlers": ["console", "file"]},
        # Every handler (and so every logger: the app's, Litestar's, uvicorn's access and error logs) uses it.
        formatters={"standard": {"class": "ai_platform.logging_config.SafeFormatter", "format": LOG_FORMAT}},
        handlers={
            "console": {"class": "logging.StreamHandler", "formatter": "standard"},
            "file": {
                "class": "ai_platform.logging_config.SharedRotatingFileHandler",
                "formatter": "standard",
                "filename": str(log_dir / LOG_FILE_NAME),
                "maxBytes": max_bytes,
                "backupCount": backup_count,
                "encoding": "utf-8",
            },
        },
        loggers={
            "ai_platform": {"level": level, "propagate": True},
            # Litestar's own logger writes the same handlers (by default it has a console of its own).
            "litestar": {"level": level, "handlers": ["console", "file"], "propagate": False},
        },
        log_exceptions="debug",
        configure_root_logger=True,
    )
