"""The platform's error hierarchy.

Every error a client can cause, or that the platform reports on purpose,
is a subclass of :class:`PlatformError` with its HTTP status code. The API
layer maps them to the seed's wire format in one place
(``ai_platform.api.errors``); nothing else turns exceptions into responses.
"""

from __future__ import annotations


class PlatformError(Exception):
    """Base class: ``status_code`` and a client-safe ``detail`` message."""

    status_code: int = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers that go with this error's response."""
        return {}


class AuthenticationError(PlatformError):
    """Missing, unknown or insufficient API key."""

    status_code = 403

    def __init__(self, detail: str = "Invalid or missing API key.") -> None:
        super().__init__(detail)


class NotFoundError(PlatformError):
    status_code = 404


class RequestValidationError(PlatformError):
    """A request that does not match its schema; rendered as the seed's 422 body."""

    status_code = 422

    def __init__(self, errors: list[dict[str, object]]) -> None:
        super().__init__("Request validation failed.")
        self.errors = errors

    @classmethod
    def one(cls, type: str, msg: str, *, loc: list[str], input: object = None) -> RequestValidationError:
        """A 422 with one error entry; ``loc`` is where in the request it is (``["body", "text"]``)."""
        return cls([{"type": type, "loc": loc, "msg": msg, "input": input}])


class LimitExceededError(PlatformError):
    """A daily limit (of the operation, or of the caller's key) is used up."""

    status_code = 429

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self._headers = headers or {}

    @property
    def headers(self) -> dict[str, str]:
        """``X-RateLimit-*`` and ``Retry-After`` (seconds until the limit day ends)."""
        return self._headers


class ServiceUnavailableError(PlatformError):
    """The platform cannot serve this right now; the client may retry later."""

    status_code = 503

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ModelUnavailableError(ServiceUnavailableError):
    """The operation's model is not loaded (missing, corrupt or failed to load)."""

    def __init__(self, detail: str, *, retry_after: int = 30) -> None:
        super().__init__(detail, retry_after=retry_after)


class OverloadedError(ServiceUnavailableError):
    """The model's queue is full."""


class DatabaseUnavailableError(ServiceUnavailableError):
    """The usage database cannot be reached or is locked; nothing was counted."""

    def __init__(self, detail: str, *, retry_after: int = 5) -> None:
        super().__init__(detail, retry_after=retry_after)


class RequestTimeoutError(PlatformError):
    """The request took longer than ``REQUEST_TIMEOUT_SECONDS``; its generation was stopped."""

    status_code = 504


class EngineError(PlatformError):
    """A remote engine failed to answer (an error status, or an answer that is not OpenAI's format).

    The detail names the engine and gives a short reason; the engine's own body is logged, never sent.
    """

    status_code = 502


class ClientDisconnectedError(PlatformError):
    """The client went away before its response was ready; its work was stopped (nginx's 499)."""

    status_code = 499

    def __init__(self, detail: str = "Client closed the request.") -> None:
        super().__init__(detail)


class OperationError(PlatformError):
    """A plugin failed to build its prompt or response: our bug, never the client's."""

    status_code = 500


class ConfigurationError(Exception):
    """Invalid settings; stops startup. The message names the offending setting."""


class PluginError(Exception):
    """A plugin failed to load, register or validate. The message names the plugin."""
