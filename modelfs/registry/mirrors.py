"""Mirrors and pull-through caches in front of a registry.

Reads (manifests, blobs) try each configured mirror in order and fall back to the upstream
registry, the way containerd and Docker treat ``registry-mirrors``: a Distribution
pull-through cache, Harbor's proxy cache or Dragonfly's dfdaemon sits in the path by
configuration. A mirror that fails (unreachable, 5xx, refused) is skipped for a while instead
of being retried on every request. A mirror that answers "not found" is healthy — a
pull-through cache lacks whatever it was never asked for, such as the block-index tag — so
only that request moves on to the next source. Writes never go to mirrors.

Each mirror is a :class:`RegistryClient` of its own origin (:mod:`.origin`): the credentials
it may get are those stored for the mirror's own host, never the registry's, and a 401 it
sends that those cannot answer is its refusal, which moves the read on to the next source.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TypeVar

import httpx
import trio

from ..credentials import CredentialStore
from ..errors import IntegrityError, NotFoundError, RegistryError
from ..retry import MIRROR_RETRY, RetryPolicy
from .client import CONTROL_TIMEOUT, BlobBody, RegistryClient
from .ranges import BlobLocation

log = logging.getLogger(__name__)

T = TypeVar("T")

PENALTY_SECONDS = 30.0


class MirroredClient:
    """The read side of :class:`RegistryClient`, spread over mirrors and the upstream."""

    def __init__(self, upstream: RegistryClient, mirrors: list[RegistryClient]) -> None:
        self.upstream, self.mirrors = upstream, mirrors
        self.registry = upstream.registry
        self._down_until: dict[str, float] = {}
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> MirroredClient:
        for client in [*self.mirrors, self.upstream]:
            await self._stack.enter_async_context(client)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    def _candidates(self) -> list[RegistryClient]:
        now = trio.current_time()
        up = [m for m in self.mirrors if self._down_until.get(m.host, 0.0) <= now]
        return [*up, self.upstream]

    def suspect(self, what: str) -> None:
        """Bytes read through us did not match their digest: leave the mirrors out for a
        while, so the retry reads from the registry itself (a mirror is untrusted by design;
        content addressing caught it, and now routes around it)."""
        for mirror in self.mirrors:
            self._failed(mirror, IntegrityError(f"{what} did not match its digest"))

    def _failed(self, mirror: RegistryClient, exc: Exception) -> None:
        self._down_until[mirror.host] = trio.current_time() + PENALTY_SECONDS
        log.warning("mirror %s failed (%s); using the next source for %.0fs", mirror.host, exc, PENALTY_SECONDS)

    async def _first(self, call: Callable[[RegistryClient], Awaitable[T]]) -> T:
        """``call`` on the first source that answers: each mirror in turn, then the upstream."""
        for client in self._candidates():
            if client is self.upstream:
                return await call(client)
            try:
                return await call(client)
            except NotFoundError as exc:
                log.debug("mirror %s: %s; asking the next source", client.host, exc)
            except (RegistryError, IntegrityError, httpx.HTTPError) as exc:
                self._failed(client, exc)
        raise AssertionError("unreachable")

    async def get_manifest(self, repository: str, target: str, retry: RetryPolicy | None = None
                           ) -> tuple[bytes, str, str]:
        return await self._first(lambda client: client.get_manifest(repository, target, retry))

    async def get_blob(self, repository: str, digest: str, max_size: int = 4 << 20,
                       retry: RetryPolicy | None = None) -> bytes:
        return await self._first(lambda client: client.get_blob(repository, digest, max_size, retry))

    async def blob_size(self, repository: str, digest: str, retry: RetryPolicy | None = None) -> int | None:
        return await self._first(lambda client: client.blob_size(repository, digest, retry))

    async def locate_blob(self, repository: str, digest: str, retry: RetryPolicy | None = None) -> BlobLocation:
        return await self._first(lambda client: client.locate_blob(repository, digest, retry))

    async def blob_location(self, repository: str, digest: str) -> BlobLocation:
        return await self._candidates()[0].blob_location(repository, digest)

    def without_mirrors(self) -> RegistryClient:
        return self.upstream

    def moved_location(self, location: BlobLocation, url: str) -> BlobLocation:
        return self.upstream.moved_location(location, url)

    def location_failed(self, location: BlobLocation, exc: Exception) -> None:
        """A range read from ``location`` failed: if a mirror served it, leave that mirror out
        for a while (the next location comes from the next source)."""
        for mirror in self.mirrors:
            if mirror.host == location.source:
                self._failed(mirror, exc)

    @property
    def ca_file(self) -> str | None:
        return self.upstream.ca_file

    async def referrers(self, repository: str, digest: str, retry: RetryPolicy | None = None) -> bytes | None:
        return await self._first(lambda client: client.referrers(repository, digest, retry))

    @asynccontextmanager
    async def stream_blob(self, repository: str, digest: str, start: int | None = None,
                          end: int | None = None, retry: RetryPolicy | None = None) -> AsyncIterator[BlobBody]:
        for client in self._candidates():
            stack = AsyncExitStack()
            try:
                response = await stack.enter_async_context(client.stream_blob(repository, digest, start, end, retry))
            except (RegistryError, httpx.HTTPError) as exc:
                await stack.aclose()
                if client is self.upstream:
                    raise
                if not isinstance(exc, NotFoundError):
                    self._failed(client, exc)
                continue
            async with stack:
                yield response
            return


def open_client(registry: str, *, plain_http: bool = False, ca_file: str | None = None,
                mirrors: list | None = None, credentials: CredentialStore | None = None,
                timeout: float = CONTROL_TIMEOUT, fail_fast: bool = False) -> RegistryClient | MirroredClient:
    """A client for ``registry``; with mirrors, one that reads through them first.
    ``fail_fast``: a command run by hand (not a mount daemon, which waits for its registry to
    come back) says at once that a host refuses connections or does not resolve."""
    credentials = credentials or CredentialStore()
    upstream = RegistryClient(registry, credentials, plain_http=plain_http, ca_file=ca_file, timeout=timeout,
                              retry=RetryPolicy(fail_fast=fail_fast))
    if not mirrors:
        return upstream
    mirror_retry = MIRROR_RETRY.within(RetryPolicy(fail_fast=fail_fast))
    return MirroredClient(upstream, [
        RegistryClient(m.host, credentials, plain_http=m.plain_http, ca_file=ca_file, retry=mirror_retry, timeout=timeout)
        for m in mirrors])
