"""Bearer tokens, configured as hashes: ``FILESERVER_SERVE_TOKENS`` is a comma-separated
list of ``<sha256 hex of the token>[:<scope>+<scope>]``.

Scopes: ``read`` (lists, metadata, talk groups) and ``listen`` (audio: presigned URLs and
the proxy); an entry without scopes has both. The server never holds a token, only its
hash; a presented token is hashed and compared with every configured hash in constant
time (:func:`hmac.compare_digest`, no early exit), so neither the answer's timing nor
the log says which hash came close. ``fileserver serve --new-token`` prints a fresh
token and the entry to configure.

* no ``Authorization: Bearer`` header: 401 ``missing_token``;
* a token that matches no hash: 401 ``invalid_token``;
* a known token without the endpoint's scope: 403 ``insufficient_scope``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from fileserver.errors import ConfigError

SCOPES = ("read", "listen")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def token_hash(token: str) -> str:
    """The SHA-256 hex digest of ``token`` (what ``FILESERVER_SERVE_TOKENS`` holds)."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """A random token (256 bits, URL-safe) and its configuration entry."""
    token = secrets.token_urlsafe(32)
    return token, token_hash(token)


@dataclass(frozen=True)
class Grant:
    """What a matched token may do; ``id`` (the hash's first 12 hex digits) is what the
    request log shows."""

    id: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class Denied:
    status: int  # 401 or 403
    error: str
    detail: str


class TokenTable:
    """The configured hashes and their scopes."""

    def __init__(self, entries: Iterable[tuple[bytes, frozenset[str]]]) -> None:
        self._entries = list(entries)

    def __len__(self) -> int:
        return len(self._entries)

    @classmethod
    def parse(cls, items: Iterable[str], setting: str = "FILESERVER_SERVE_TOKENS") -> TokenTable:
        entries: list[tuple[bytes, frozenset[str]]] = []
        for n, item in enumerate(items, 1):
            digest, _, scope_text = item.strip().partition(":")
            digest = digest.strip().lower()
            if not _HEX64.fullmatch(digest):
                raise ConfigError(
                    f"{setting}: entry {n} is not a SHA-256 hex digest (64 hex digits); "
                    "`fileserver serve --new-token` prints a token and its entry"
                )
            scopes = frozenset(s.strip() for s in scope_text.split("+") if s.strip())
            unknown = scopes - set(SCOPES)
            if unknown:
                raise ConfigError(
                    f"{setting}: entry {n} has unknown scope(s) {sorted(unknown)} "
                    f"(known: {', '.join(SCOPES)})"
                )
            entries.append((bytes.fromhex(digest), scopes or frozenset(SCOPES)))
        return cls(entries)

    def match(self, token: str) -> Grant | None:
        """The grant of ``token``: every hash is compared (constant time each)."""
        # a header that is not UTF-8 reaches us as lone surrogates: hash its bytes as they
        # came (it then matches nothing) rather than fail the request
        presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: Grant | None = None
        for digest, scopes in self._entries:
            if hmac.compare_digest(presented, digest) and found is None:
                found = Grant(digest.hex()[:12], scopes)
        return found

    def authorize(self, header: str | None, scope: str) -> Grant | Denied:
        """The grant for an ``Authorization`` header value and the endpoint's scope."""
        if not header:
            return Denied(401, "missing_token", "send Authorization: Bearer <token>")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return Denied(401, "missing_token", "send Authorization: Bearer <token>")
        grant = self.match(token)
        if grant is None:
            return Denied(401, "invalid_token", "the token is not one of the configured ones")
        if scope not in grant.scopes:
            return Denied(403, "insufficient_scope", f"this token lacks the scope {scope!r}")
        return grant
