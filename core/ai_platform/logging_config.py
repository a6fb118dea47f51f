"""Logging: console (journald under systemd) plus a size-rotated file in ``LOG_DIR``."""

from __future__ import annotations

from pathlib import Path

from litestar.logging.config import LoggingConfig

LOG_FILE_NAME = "platform.log"


def logging_config(level: str, log_dir: Path) -> LoggingConfig:
    log_dir.mkdir(parents=True, exist_ok=True)
    return LoggingConfig(
        root={"level": level, "handlers": ["console", "file"]},
        formatters={"standard": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
        handlers={
            "console": {"class": "logging.StreamHandler", "formatter": "standard"},
            "file": {
                "class": "logging.handlers.RotatingFileHandler",
                "formatter": "standard",
                "filename": str(log_dir / LOG_FILE_NAME),
                "maxBytes": 10 * 1024 * 1024,
                "backupCount": 5,
                "encoding": "utf-8",
            },
        },
        loggers={"ai_platform": {"level": level, "propagate": True}},
        log_exceptions="debug",
        configure_root_logger=True,
    )
