"""One line of progress per build step, with elapsed seconds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Progress:
    """Prints each finished step with its own duration and the time since start."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def note(self, message: str) -> None:
        """Print ``message`` after the time since start."""
        print(f"[{time.monotonic() - self._start:6.1f}s] {message}", flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the enclosed block and report it as ``name`` once it finishes."""
        began = time.monotonic()
        yield
        self.note(f"{name} ({time.monotonic() - began:.1f}s)")
