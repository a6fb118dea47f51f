"""Logging: console (journald under systemd) plus a size-rotated file in ``LOG_DIR``.

Every worker process of ``ai-platform serve --workers N`` writes the same
``platform.log``. The standard ``RotatingFileHandler`` is unsafe there: each
process rotates on its own idea of the file's size, so at a rotation one process
renames the file while the others keep writing into the renamed one (or rotate it
again), and lines land in the wrong file, get overwritten or vanish with a deleted
backup. :class:`SharedRotatingFileHandler` is the same handler made safe across
processes, with the same files and settings, so nothing changes for an admin.
"""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
from pathlib import Path
from typing import TextIO

from litestar.logging.config import LoggingConfig

LOG_FILE_NAME = "platform.log"
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUP_COUNT = 5


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
        formatters={"standard": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
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
        loggers={"ai_platform": {"level": level, "propagate": True}},
        log_exceptions="debug",
        configure_root_logger=True,
    )
