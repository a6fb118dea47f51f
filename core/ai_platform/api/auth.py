"""Authentication (middleware) and authorisation (guards) by API key: ``X-API-Key``, or ``Authorization: Bearer``.

OpenAI's clients send the key as ``Authorization: Bearer KEY``; every route accepts it, and
``X-API-Key`` wins when a request has both.

Keys are compared in constant time against every configured key, so timing
reveals neither which key matched nor how much of a key was right. Only a
keyed hash of the key (its id) is ever stored or logged.

Spaces and tabs around the header's value are not part of the key (RFC 9110's
optional whitespace): the HTTP parser drops those before the value but keeps
those after it, so the key is stripped on both sides here, the one rule.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult, DefineMiddleware

from ai_platform.errors import AuthenticationError

API_KEY_HEADER = "X-API-Key"
BEARER = "bearer"
PUBLIC_PATHS = ["^/health$"]
_OWS = " \t"  # optional whitespace around a header value


def key_id(api_key: str, secret_key: str) -> str:
    """A stable, non-reversible id for an API key (HMAC with ``SECRET_KEY``), safe to store and log."""
    return hmac.new(secret_key.encode(), api_key.encode(), hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class Principal:
    """The authenticated caller, as ``request.user``."""

    key_id: str
    is_admin: bool


class KeyRing:
    """The configured keys, held only as SHA-256 digests (and their ids)."""

    def __init__(self, client_keys: list[str], admin_keys: list[str], secret_key: str) -> None:
        self._client = [self._digest(k) for k in client_keys]
        self._admin = [self._digest(k) for k in admin_keys]
        # Each key's id, computed once rather than an HMAC per request.
        self._ids = {self._digest(k): key_id(k, secret_key) for k in [*client_keys, *admin_keys]}

    @property
    def key_ids(self) -> list[str]:
        """The ids of the configured keys (client keys first), each once."""
        return list(dict.fromkeys(self._ids.values()))

    @staticmethod
    def _digest(key: str) -> bytes:
        return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()

    @staticmethod
    def _matches(candidate: bytes, digests: list[bytes]) -> bool:
        found = False
        for digest in digests:  # no early exit: the loop takes the same time whichever key matches
            found |= hmac.compare_digest(candidate, digest)
        return found

    def authenticate(self, key: str | None) -> Principal:
        """The caller whose ``X-API-Key`` value is ``key``; spaces and tabs around it are ignored."""
        key = key.strip(_OWS) if key else key
        if not key:
            raise AuthenticationError()
        candidate = self._digest(key)
        is_admin = self._matches(candidate, self._admin)
        if not (self._matches(candidate, self._client) or is_admin):
            raise AuthenticationError()
        return Principal(key_id=self._ids[candidate], is_admin=is_admin)


class ApiKeyMiddleware(AbstractAuthenticationMiddleware):
    def __init__(self, app: object, keyring: KeyRing, **kwargs: object) -> None:
        super().__init__(app, **kwargs)  # type: ignore[arg-type]
        self.keyring = keyring

    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:  # type: ignore[type-arg]
        principal = self.keyring.authenticate(
            presented_key(connection.headers.get(API_KEY_HEADER), connection.headers.get("authorization"))
        )
        return AuthenticationResult(user=principal, auth=None)


def presented_key(api_key: str | None, authorization: str | None) -> str | None:
    """The key a request presents: its ``X-API-Key``, else the credentials of ``Authorization: Bearer``."""
    if api_key is not None or authorization is None:
        return api_key
    scheme, _, credentials = authorization.strip(_OWS).partition(" ")
    return credentials if scheme.lower() == BEARER else None


def api_key_middleware(keyring: KeyRing) -> DefineMiddleware:
    return DefineMiddleware(ApiKeyMiddleware, keyring=keyring, exclude=PUBLIC_PATHS)


def admin_only(connection: ASGIConnection, _: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    """Guard: the caller's key must be one of ``ADMIN_API_KEYS``."""
    user = connection.scope.get("user")
    if not (isinstance(user, Principal) and user.is_admin):
        raise AuthenticationError("This action requires an admin API key.")
