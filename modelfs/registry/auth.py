"""Registry authentication: WWW-Authenticate challenges and bearer tokens.

Distribution answers 401 with ``WWW-Authenticate: Bearer realm=...,service=...,scope=...``
(token auth) or ``Basic realm=...`` (htpasswd). Tokens are cached per scope until shortly
before they expire; a 401 with a cached token drops it and asks again once. Only the
registry's own origin is ever answered (:mod:`.origin`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import httpx
import trio

from ..credentials import Credential, CredentialStore
from ..errors import AuthenticationError, UnavailableError
from .bounded import MAX_BODY_BYTES, read_bounded
from .origin import Origin

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


class Authenticator:
    """The credentials of one registry, looked up once, and the tokens they bought."""

    def __init__(self, registry: str, origin: Origin, credentials: CredentialStore | None) -> None:
        self.registry, self.origin = registry, origin
        self._credentials = credentials
        self._credential: Credential | None = None
        self._credential_loaded = False
        self._credential_lock = trio.Lock()
        self.tokens = TokenCache()
        self._basic = False

    async def credential(self) -> Credential | None:
        async with self._credential_lock:  # concurrent uploads must not see a half-done lookup
            if not self._credential_loaded:
                if self._credentials is not None:
                    self._credential = await self._credentials.lookup(self.registry)
                self._credential_loaded = True
        return self._credential

    def use(self, credential: Credential) -> None:
        """Use these credentials instead of the stored ones (``login`` checks them first)."""
        self._credential, self._credential_loaded = credential, True

    async def header(self, scope: str) -> str | None:
        """The ``Authorization`` a request for ``scope`` carries (to the registry's origin only)."""
        token = self.tokens.get(scope)
        if token:
            return f"Bearer {token}"
        if self._basic:
            credential = await self.credential()
            return credential.basic if credential else None
        return None

    async def answer(self, response: httpx.Response, scope: str, http: httpx.AsyncClient) -> None:
        """Answer a 401 of the registry's own origin (the caller checked: a 401 from anywhere
        else is a refusal, never a challenge; see :mod:`.origin`)."""
        assert self.origin.owns(response.url), "only the registry's own origin may ask for credentials"
        self.tokens.drop(scope)
        challenge = parse_challenge(response.headers.get("www-authenticate", ""))
        credential = await self.credential()
        if challenge is None:
            raise AuthenticationError(f"{self.registry} refused the request (401) without saying how to authenticate")
        if challenge.scheme == "basic":
            if credential is None:
                raise AuthenticationError(f"{self.registry} requires authentication: run `modelfs login {self.registry}`")
            self._basic = True
            return
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            raise AuthenticationError(f"{self.registry} asks for unsupported authentication {challenge.scheme!r}")
        await self._fetch_token(challenge.params, scope, credential, http)

    async def _fetch_token(self, params: dict[str, str], scope: str, credential: Credential | None,
                           http: httpx.AsyncClient) -> None:
        query: list[tuple[str, str | int | float | bool | None]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        query.extend(("scope", s) for s in scope.split(" ") if s)
        # the realm may be another host (Docker Hub's token service is): the registry's own
        # origin named it in its 401, so it is where the registry sends us to log in; but a
        # registry reached over TLS never gets the password sent in clear by naming http://
        realm = httpx.URL(params["realm"])
        if credential is not None and self.origin.scheme == "https" and realm.scheme != "https":
            raise AuthenticationError(f"{self.registry} names a token service without TLS ({realm.scheme}://{realm.host}); "
                                      "refusing to send the credentials there in clear")
        headers = {"Authorization": credential.basic} if credential else {}
        try:
            request = http.build_request("GET", params["realm"], params=query, headers=headers)
            response = await read_bounded(await http.send(request, stream=True), "GET", params["realm"], MAX_BODY_BYTES)
        except httpx.TransportError as exc:
            raise UnavailableError(f"cannot reach the token service of {self.registry}: {exc}") from None
        if response.status_code in (401, 403):
            if credential is None:
                raise AuthenticationError(f"{self.registry} requires authentication: run `modelfs login {self.registry}`")
            raise AuthenticationError(
                f"{self.registry} rejected the credentials of {credential.username!r} (wrong password? run `modelfs login {self.registry}`)")
        if response.status_code != 200:
            raise AuthenticationError(f"token service of {self.registry} answered HTTP {response.status_code}")
        try:
            doc = response.json()
            token = doc.get("token") or doc.get("access_token")
        except ValueError:
            token = None
        if not token:
            raise AuthenticationError(f"token service of {self.registry} returned no token")
        self.tokens.put(scope, token, doc.get("expires_in"))
