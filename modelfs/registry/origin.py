"""Where credentials may go: the registry's own origin, and nowhere else.

An origin is a scheme, a host and a port (RFC 6454): an https -> http downgrade on the same
host is another origin, so is another port. One rule, decided here and applied at every site
that sends a credential (doc/ARCHITECTURE.md, "Data plane"):

- ``Authorization`` (the user's password, or a bearer token the registry's token service
  issued) is sent only to a URL on the registry's origin: the first request, every hop of a
  redirect, an upload location, a range read by a worker thread. A redirect chain that left
  the origin stays without it.
- Only a 401 that the registry's own origin answered is a challenge to authenticate to. The
  realm it names may be on another host (Docker Hub's token service is); what matters is who
  asks. A 401 from anywhere else (blob storage a redirect led to, a CDN) is that location
  refusing, handled as an expired presigned URL is: never answered with credentials.

A mirror is a registry client of its own, with its own origin: the registry's credentials
never reach it, and its own 401 is its refusal (the read moves on to the next source).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: object) -> Origin:
        """The origin of ``url`` (a string or an ``httpx.URL``); a URL that cannot be parsed
        has an origin equal to no other."""
        parts = urlsplit(str(url))
        scheme = parts.scheme.lower()
        try:
            port = parts.port or _DEFAULT_PORTS.get(scheme, -1)
        except ValueError:  # a port that is not a number
            return cls("invalid", str(url), -1)
        return cls(scheme, (parts.hostname or "").lower(), port)

    def owns(self, url: object) -> bool:
        """Whether ``url`` is on this origin (a request to it may carry our credentials)."""
        return self.port != -1 and Origin.of(url) == self

    def allow(self, url: object, authorization: str | None) -> str | None:
        """``authorization`` if it may be sent to ``url``, else None."""
        return authorization if authorization and self.owns(url) else None

    def restrict(self, url: object, headers: dict[str, str]) -> dict[str, str]:
        """``headers`` to send to ``url``: without ``Authorization`` unless it is on this origin."""
        if self.owns(url):
            return headers
        return {key: value for key, value in headers.items() if key.lower() != "authorization"}

    def __str__(self) -> str:
        default = _DEFAULT_PORTS.get(self.scheme)
        return f"{self.scheme}://{self.host}" + ("" if self.port == default else f":{self.port}")
