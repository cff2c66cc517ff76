"""Registry authentication: WWW-Authenticate challenges and bearer tokens.

Distribution answers 401 with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``
(token auth) or ``Basic realm=...`` (htpasswd). Tokens are cached per scope until shortly
before they expire; a 401 with a cached token drops it and asks again once.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

_PARAM = re.compile(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "bearer" or "basic"
    params: dict[str, str] = field(default_factory=dict)


def parse_challenge(header: str) -> Challenge | None:
    """Parse the first challenge of a WWW-Authenticate header."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)) for m in _PARAM.finditer(rest)}
    return Challenge(scheme.lower(), params)


@dataclass
class Token:
    value: str
    expires_at: float

    @property
    def fresh(self) -> bool:
        return time.monotonic() < self.expires_at


class TokenCache:
    """Bearer tokens by scope string; nothing here ever logs a token."""

    def __init__(self) -> None:
        self._tokens: dict[str, Token] = {}

    def get(self, scope: str) -> str | None:
        token = self._tokens.get(scope)
        if token and token.fresh:
            return token.value
        return None

    def put(self, scope: str, value: str, expires_in: int | float | None) -> None:
        lifetime = float(expires_in) if expires_in else 60.0
        self._tokens[scope] = Token(value, time.monotonic() + max(lifetime - 10.0, lifetime * 0.5))

    def drop(self, scope: str) -> None:
        self._tokens.pop(scope, None)
