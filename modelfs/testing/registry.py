"""A registry in memory: blobs and manifests behind the interfaces the registry client offers.

A range is answered as HTTP would answer it (a status, headers, a body read with
``readinto``) and that answer goes through the same body checks a real one does
(:mod:`modelfs.registry.ranges`), so a 200 to a ``Range``, a 206 for other bytes or a body
cut short are met exactly as on the wire. What it answers is decided by its failure layer
(:class:`~.faults.Faults`), empty unless a test schedules something.

Everything it did is counted (``ranges``, ``streams``, ``locations``, ``probes``,
``bytes_sent``), so a test asserts what reached the "network", as the real-registry tests
assert what a proxy saw.
"""

from __future__ import annotations

import hashlib
import http.client
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx

from ..errors import NotFoundError, RegistryError
from ..formats.blockindex import ALGORITHMS, BlockIndex, TrustedIndex
from ..registry.client import BlobBody
from ..registry.origin import Origin
from ..registry.protocol import RangeReader, RegistryReader
from ..registry.ranges import BlobLocation, Transfer, TransferAborted, receive_range
from ..retry import RetryPolicy
from .faults import Faults

STREAM_CHUNK = 16 << 10  # bytes per chunk of a streamed body
STALL_LIMIT = 30.0  # real seconds a stalled body waits to be aborted before it fails by itself


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def index_of(*blobs: bytes, block_size: int, vouched: bool = True) -> TrustedIndex:
    """A BLAKE3 block index of ``blobs``, as a manifest would name it (``vouched``)."""
    hashes = {digest_of(data): [ALGORITHMS["blake3"](data[i:i + block_size]) for i in range(0, len(data), block_size)]
              for data in blobs}
    return TrustedIndex(BlockIndex(block_size, hashes, "blake3"), vouched)


@dataclass(frozen=True)
class RangeAsked:
    """One ranged GET as the fake received it: bytes [start, end) of ``digest``."""

    digest: str
    start: int
    end: int

    def covers(self, offset: int) -> bool:
        return self.start <= offset < self.end


class FakeResponse:
    """An answer to a ranged GET, with the members of ``http.client.HTTPResponse`` the body
    checks read. ``stall_at``: the body stops there until the transfer is aborted (as a
    socket shut down from the watchdog's thread); ``cut_at``: the body ends there, short of
    what the headers announced (a connection dropped)."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str], transfer: Transfer,
                 stall_at: int | None = None, cut_at: int | None = None,
                 on_sent: Callable[[int], None] = lambda size: None) -> None:
        self.status = status
        self.reason = http.client.responses.get(status, "")
        self.length: int | None = len(body)
        self.will_close = False
        self._headers = {name.lower(): value for name, value in headers.items()}
        self._body = body
        self._at = 0
        self._end = len(body) if cut_at is None else min(cut_at, len(body))
        self._stall_at = stall_at
        self._transfer = transfer
        self._on_sent = on_sent

    def getheader(self, name: str) -> str | None:
        return self._headers.get(name.lower())

    def readinto(self, view: bytearray | memoryview) -> int:
        if self._stall_at is not None and self._at >= self._stall_at:
            self._stall()
        stop = self._end if self._stall_at is None or self._at >= self._stall_at else min(self._end, self._stall_at)
        count = min(len(view), stop - self._at)
        view[:count] = self._body[self._at:self._at + count]
        self._at += count
        self._on_sent(count)
        if self.length is not None:
            self.length = max(0, self.length - count)
        return count

    @property
    def sent(self) -> int:
        """Bytes of the body read so far."""
        return self._at

    def read(self, size: int) -> bytes:
        scratch = bytearray(size)
        return bytes(scratch[:self.readinto(memoryview(scratch))])

    def _stall(self) -> None:
        """Send nothing until aborted, as a server that stopped mid-body."""
        until = time.monotonic() + STALL_LIMIT
        while self._transfer.reason is None and time.monotonic() < until:
            time.sleep(0.002)
        raise OSError("connection shut down")


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            yield chunk


@dataclass
class FakeRegistry:
    """Blobs and manifests in memory, served through the registry client's interfaces."""

    registry: str = "fake.test"
    faults: Faults = field(default_factory=Faults)
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    ranges: list[RangeAsked] = field(default_factory=list)  # every ranged GET, in order
    streams: int = 0  # GETs of a whole blob as a stream
    locations: int = 0  # locations handed out without a request
    probes: int = 0  # locations asked of the "registry" (after a refusal)
    suspected: list[str] = field(default_factory=list)  # what was said to have failed its digest
    failed_locations: int = 0
    bytes_sent: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ca_file(self) -> str | None:
        return None

    def add_blob(self, data: bytes) -> str:
        digest = digest_of(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(self, repository: str, tag: str, data: bytes, media_type: str) -> str:
        digest = digest_of(data)
        self.manifests[(repository, tag)] = self.manifests[(repository, digest)] = (data, media_type)
        return digest

    def ranges_of(self, digest: str) -> list[RangeAsked]:
        return [asked for asked in self.ranges if asked.digest == digest]

    def _blob(self, digest: str) -> bytes:
        try:
            return self.blobs[digest]
        except KeyError:
            raise NotFoundError(f"blob {digest} not found on {self.registry}") from None

    def _sent(self, size: int) -> None:
        with self._lock:
            self.bytes_sent += size

    # -- the control plane ----------------------------------------------------------------

    async def get_manifest(self, repository: str, target: str, retry: RetryPolicy | None = None
                           ) -> tuple[bytes, str, str]:
        try:
            data, media_type = self.manifests[(repository, target)]
        except KeyError:
            raise NotFoundError(f"manifest {repository}:{target} not found on {self.registry}") from None
        return data, media_type, digest_of(data)

    async def get_blob(self, repository: str, digest: str, max_size: int = 4 << 20,
                       retry: RetryPolicy | None = None) -> bytes:
        data = self._blob(digest)
        if len(data) > max_size:
            raise RegistryError(f"blob {digest} is larger than {max_size} bytes; refusing to load it whole")
        self._sent(len(data))
        return data

    async def blob_size(self, repository: str, digest: str, retry: RetryPolicy | None = None) -> int | None:
        data = self.blobs.get(digest)
        return None if data is None else len(data)

    async def referrers(self, repository: str, digest: str, retry: RetryPolicy | None = None) -> bytes | None:
        return None

    @asynccontextmanager
    async def stream_blob(self, repository: str, digest: str, start: int | None = None, end: int | None = None,
                          retry: RetryPolicy | None = None) -> AsyncIterator[BlobBody]:
        data = self._blob(digest)[start or 0:end]
        with self._lock:
            self.streams += 1
            nth = self.streams
        yield BlobBody(httpx.Response(200, stream=_Chunks(self._chunks(digest, nth, data))), what=digest)

    async def _chunks(self, digest: str, nth: int, data: bytes) -> AsyncIterator[bytes]:
        async for chunk in self.faults.stream_body(digest, nth, data, STREAM_CHUNK):
            self._sent(len(chunk))
            yield chunk

    # -- where blobs are read ---------------------------------------------------------------

    def _location(self, repository: str, digest: str, redirected: bool = False) -> BlobLocation:
        return BlobLocation(f"https://{self.registry}/v2/{repository}/blobs/{digest}", None, self.registry, math.inf,
                            redirected, owner=Origin.of(f"https://{self.registry}"))

    async def blob_location(self, repository: str, digest: str) -> BlobLocation:
        self.locations += 1
        return self._location(repository, digest)

    async def locate_blob(self, repository: str, digest: str, retry: RetryPolicy | None = None) -> BlobLocation:
        self.probes += 1
        self._blob(digest)
        return self._location(repository, digest)

    def moved_location(self, location: BlobLocation, url: str) -> BlobLocation:
        return BlobLocation(url, None, location.source, math.inf, True, owner=location.owner)

    def location_failed(self, location: BlobLocation, exc: Exception) -> None:
        self.failed_locations += 1

    def suspect(self, what: str) -> None:
        self.suspected.append(what)

    def without_mirrors(self) -> FakeRegistry:
        return self

    # -- ranged reads (on worker threads) ---------------------------------------------------

    def read_range(self, location: BlobLocation, start: int, lengths: Sequence[int],
                   on_block: Callable[[int, memoryview], None], transfer: Transfer, what: str,
                   new_buffer: Callable[[int], memoryview]) -> None:
        """Bytes [start, start + sum(lengths)) of the blob at ``location``, block by block into
        ``on_block``, as :func:`modelfs.registry.ranges.read_range` hands them over."""
        digest = location.url.rsplit("/", 1)[1]
        with self._lock:
            self.ranges.append(RangeAsked(digest, start, start + sum(lengths)))
            nth = len(self.ranges)
        answer = self.faults.answer(digest, nth, self._blob(digest), start, lengths)
        response = FakeResponse(answer.status, answer.body, answer.headers, transfer, answer.stall_at, answer.cut_at,
                                self._sent)
        delivered = self.faults.on_block(digest, nth, on_block)
        try:
            receive_range(response, start, lengths, delivered, transfer, what, location, new_buffer)
        except TransferAborted:
            with self._lock:
                self.faults.aborted += 1
            raise

    def close(self) -> None:
        """Nothing kept open."""

def _conforms(fake: FakeRegistry) -> tuple[RegistryReader, RangeReader]:
    return fake, fake  # the type checker holds the fake to the interfaces it stands in for
