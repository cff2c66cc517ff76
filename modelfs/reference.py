"""Model references: ``[host[:port]/]path[:tag][@sha256:hex]``.

Parsed the way Docker and the OCI distribution spec do, so that a reference typed for
``docker pull`` or ``modctl`` means the same thing here: a first component with a ``.`` or
``:`` (or ``localhost``) is a registry host, otherwise the host is Docker Hub and a
single-component path gets the ``library/`` prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidReferenceError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?")


@dataclass(frozen=True)
class Reference:
    """A parsed, normalised reference. ``tag`` and ``digest`` may both be set."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """Host the HTTP API lives on (Docker Hub's API is not at docker.io)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def target(self) -> str:
        """What to ask ``/v2/<repo>/manifests/<target>`` for: the digest wins over the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def without_digest(self) -> Reference:
        return Reference(self.registry, self.repository, self.tag)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse(text: str) -> Reference:
    """Parse ``text`` into a :class:`Reference`, or raise :class:`InvalidReferenceError`."""
    original = text
    if not text or text != text.strip() or any(c.isspace() for c in text):
        raise InvalidReferenceError(f"invalid reference {original!r}: empty or contains whitespace")
    if "://" in text:
        raise InvalidReferenceError(
            f"invalid reference {original!r}: drop the scheme (use --plain-http for HTTP registries)"
        )
    digest = None
    if "@" in text:
        text, digest = text.rsplit("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise InvalidReferenceError(
                f"invalid reference {original!r}: digest must be sha256: followed by 64 lowercase hex digits"
            )
    registry, slash, rest = text.partition("/")
    if slash and ("." in registry or ":" in registry or registry == "localhost" or registry.startswith("[")):
        if not _HOST.fullmatch(registry):
            raise InvalidReferenceError(f"invalid reference {original!r}: bad registry host {registry!r}")
        path = rest
    else:
        registry, path = DOCKER_HUB, text
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise InvalidReferenceError(f"invalid reference {original!r}: bad tag {tag!r}")
    if not path:
        raise InvalidReferenceError(f"invalid reference {original!r}: missing repository name")
    for component in path.split("/"):
        if not _COMPONENT.fullmatch(component):
            raise InvalidReferenceError(
                f"invalid reference {original!r}: repository component {component!r} must be lowercase "
                "letters, digits and separators (. _ __ -)"
            )
    if len(path) > 255:
        raise InvalidReferenceError(f"invalid reference {original!r}: repository name longer than 255")
    if registry in (DOCKER_HUB, "index.docker.io", DOCKER_HUB_API):
        registry = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, path, tag, digest)
