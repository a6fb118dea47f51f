"""A circuit breaker per remote engine: a dead engine answers 503 at once instead of making every request
wait for its timeout."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

DEFAULT_FAILURES = 5
DEFAULT_COOL_DOWN_SECONDS = 30.0


class CircuitBreaker:
    """Closed → open after ``failures`` consecutive failures; open for ``cool_down`` seconds; then half-open:
    one request (the probe) goes through, and its success closes the circuit, its failure opens it again.

    The engine asks :meth:`refuses` before admitting a request (no side effect), and brackets each call
    with :meth:`acquire` then :meth:`succeeded` / :meth:`failed` / :meth:`abandoned`.
    """

    def __init__(
        self,
        failures: int = DEFAULT_FAILURES,
        cool_down: float = DEFAULT_COOL_DOWN_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or cool_down <= 0:
            raise ValueError("a circuit breaker needs failures >= 1 and cool_down > 0")
        self.failures = failures
        self.cool_down = cool_down
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None  # None: closed
        self._probing = False  # half-open, and the probe is in flight

    @property
    def closed(self) -> bool:
        return self._opened_at is None

    def retry_after(self) -> int:
        """Seconds until a request may be tried again (at least 1)."""
        if self._opened_at is None:
            return 1
        return max(1, math.ceil(self._opened_at + self.cool_down - self._clock()))

    def refuses(self) -> bool:
        """Whether a request now would be refused: open and cooling down, or half-open with its probe in flight."""
        if self._opened_at is None:
            return False
        return self._probing or self._clock() < self._opened_at + self.cool_down

    def acquire(self) -> bool:
        """Whether this call may go to the engine; when half-open it becomes the probe."""
        if self.refuses():
            return False
        if self._opened_at is not None:
            self._probing = True
        return True

    def succeeded(self) -> None:
        self._consecutive = 0
        self._opened_at = None
        self._probing = False

    def failed(self) -> None:
        self._consecutive += 1
        self._probing = False
        if self._opened_at is not None or self._consecutive >= self.failures:
            self._opened_at = self._clock()  # (re)open: a failed probe starts a new cool-down

    def abandoned(self) -> None:
        """The call ended without a verdict (its client left): a half-open circuit lets the next one probe."""
        self._probing = False
