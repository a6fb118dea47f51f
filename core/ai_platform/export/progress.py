"""Build progress: one line per finished step with elapsed seconds, and bars for long counted steps."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm


class Progress:
    """Prints each finished step with its own duration and the time since start."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def note(self, message: str) -> None:
        """Print ``message`` after the time since start."""
        print(f"[{time.monotonic() - self._start:6.1f}s] {message}", flush=True)

    def warn(self, message: str) -> None:
        """Print ``message`` as a warning on stderr, after the time since start."""
        print(f"[{time.monotonic() - self._start:6.1f}s] warning: {message}", file=sys.stderr, flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the enclosed block and report it as ``name`` once it finishes."""
        began = time.monotonic()
        yield
        self.note(f"{name} ({time.monotonic() - began:.1f}s)")


def bar(desc: str, total: int, unit: str = "it") -> tqdm:
    """A bar on stderr for part of a step, ``update``d by hand; gone when done, the step's line stays.

    Drawn only when stderr is a terminal (``disable=None``): logs keep just the step lines.
    """
    return tqdm(
        desc=desc,
        total=total,
        unit=unit,
        unit_scale=True,
        unit_divisor=1024 if unit == "B" else 1000,
        leave=False,
        disable=None,
        file=sys.stderr,
    )
