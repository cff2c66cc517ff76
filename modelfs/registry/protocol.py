"""What reading a model needs from a registry, as Protocols: the registry client, the client
that reads through mirrors first, and the fake registry of the tests (:mod:`modelfs.testing`)
all provide them, and everything that only reads (resolving, mounting, pulling, extracting)
is typed against them, so any of them can be passed and the type checker says so.

- :class:`BlobLocator`: where a blob's ranges are read (the control plane answers; nothing
  is read), and what to do when a location fails or served bytes that were wrong.
- :class:`RangeReader`: reading a range at such a location into block buffers, on a worker
  thread (:class:`~.ranges.HttpRanges` over ``http.client``; the fake in memory).
- :class:`RegistryReader`: the control plane: manifests, small blobs, referrers, a blob as
  one stream; and locations.

No capability is probed with ``getattr``: a client without mirrors answers ``suspect`` and
``location_failed`` by doing nothing, and ``without_mirrors`` with itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from ..retry import RetryPolicy
from .client import BlobBody
from .ranges import BlobLocation, Transfer

OnBlock = Callable[[int, memoryview], None]  # (position in the range, block), on the worker thread
NewBuffer = Callable[[int], memoryview]  # a buffer of that many bytes for the next block


class BlobLocator(Protocol):
    @property
    def ca_file(self) -> str | None:
        """The CA bundle the data plane's TLS trusts (None: the default one)."""

    async def blob_location(self, repository: str, digest: str) -> BlobLocation:
        """Where ranges of ``digest`` are read first, without a request of its own."""

    async def locate_blob(self, repository: str, digest: str, retry: RetryPolicy | None = None) -> BlobLocation:
        """Where ranges of ``digest`` are read, asked of the registry (auth renewed, redirects
        followed)."""

    def moved_location(self, location: BlobLocation, url: str) -> BlobLocation:
        """The location a redirect of ``location`` to ``url`` points to."""

    def location_failed(self, location: BlobLocation, exc: Exception) -> None:
        """A range read from ``location`` failed with ``exc`` (a mirror is left out a while)."""

    def suspect(self, what: str) -> None:
        """Bytes read through this client did not match their digest (mirrors are left out a
        while, so the next attempt reads from the registry itself)."""


class RangeReader(Protocol):
    def read_range(self, location: BlobLocation, start: int, lengths: Sequence[int], on_block: OnBlock,
                   transfer: Transfer, what: str, new_buffer: NewBuffer) -> None:
        """Bytes ``start .. start + sum(lengths)`` at ``location``, each block in its own new
        buffer handed to ``on_block`` as soon as it is complete; on a worker thread. Raises on
        anything short of exactly the bytes asked for (:mod:`.ranges` says what each means)."""

    def close(self) -> None:
        """Close kept-alive connections (once no worker uses them any more)."""


class RegistryReader(BlobLocator, Protocol):
    registry: str

    # ``retry``: a tighter policy for this one request than the client's own (fewer attempts, a
    # shorter deadline, failing fast: :meth:`~modelfs.retry.RetryPolicy.within`), never a looser one

    async def get_manifest(self, repository: str, target: str, retry: RetryPolicy | None = None
                           ) -> tuple[bytes, str, str]: ...

    async def get_blob(self, repository: str, digest: str, max_size: int = 4 << 20,
                       retry: RetryPolicy | None = None) -> bytes: ...

    async def blob_size(self, repository: str, digest: str, retry: RetryPolicy | None = None) -> int | None: ...

    async def referrers(self, repository: str, digest: str, retry: RetryPolicy | None = None) -> bytes | None: ...

    def stream_blob(self, repository: str, digest: str, start: int | None = None, end: int | None = None,
                    retry: RetryPolicy | None = None) -> AbstractAsyncContextManager[BlobBody]: ...

    def without_mirrors(self) -> RegistryReader:
        """The client of the registry the reference names, never a mirror: for what only its
        word counts (an index or signature attached there, not named by the manifest)."""
