"""Blob ranges read straight into block buffers, in worker threads: the data path's HTTP.

httpx on trio stays the client for everything that is control (auth, tokens, manifests,
redirects, small blobs). Blob bytes are the per-byte work of a mount, and measured here
(doc/BENCHMARKS.md, "Where a cold GiB goes") httpx/h11 copies each byte three times on the thread that also
answers FUSE. So a range is read with the standard library's ``http.client`` in a worker
thread: the body goes by ``readinto`` into the block's own buffer (the socket reads run with
the GIL released), and that buffer is what gets hashed, written to the cache and served.

Where to send the request comes from the control plane as a :class:`BlobLocation`: the URL
after redirects (a CDN or presigned storage URL as real registries use), with
``Authorization`` sent only when that URL is on the origin the credential belongs to (the
rule of :mod:`.origin`, applied again here, where the request leaves). A location the server
no longer honours (a token or presigned URL that expired, storage that asks for credentials)
raises :class:`LocationRejected`, and the control plane resolves a fresh one. A transfer can be aborted from another thread
(a stalled server, an unmount): its socket is shut down, so the blocked read returns at once.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urljoin, urlsplit

from ..errors import ConnectionLostError, IntegrityError, RegistryError
from .origin import Origin

IDLE_PER_ORIGIN = 16  # kept-alive connections per origin: one per worker is plenty


@dataclass(frozen=True)
class BlobLocation:
    """Where the bytes of one blob can be read right now."""

    url: str
    authorization: str | None  # sent only to ``owner``
    source: str  # host that answered for the registry (a mirror, or the registry itself)
    expires: float  # time.monotonic() after which the control plane resolves it again
    redirected: bool = False
    owner: Origin = field(kw_only=True)  # the origin ``authorization`` belongs to: the registry's, or a mirror's


class LocationRejected(RegistryError):
    """The location does not serve the blob (401/403: a token or presigned URL that expired;
    404: not there): the control plane resolves it again, with a request of its own."""

    retryable = True


class LocationMoved(RegistryError):
    """The server redirected the range (to blob storage, a CDN): read from ``url`` instead."""

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


class RangeRefused(RegistryError):
    """The server answered the range with an error that another attempt may cure (408, 429, 5xx)."""

    retryable = True

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class WrongRange(RegistryError):
    """The server answered with other bytes than asked (a confused proxy or cache)."""

    retryable = True


class TransferAborted(ConnectionLostError):
    """Another thread stopped this transfer (no progress within the timeout, or unmount)."""


@dataclass(eq=False)
class Transfer:
    """One range request in a worker thread, as the trio side sees it: progress to watch, and
    ``abort`` to stop it from outside. ``clock``: the watcher's (trio's, read from the worker
    thread; a test's virtual one)."""

    clock: Callable[[], float] = time.monotonic
    last_progress: float = -1.0
    blocks: int = 0
    reason: str | None = None
    _sock: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.last_progress < 0:
            self.last_progress = self.clock()

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            if self.reason is not None and sock is not None:
                raise TransferAborted(self.reason)
            self._sock = sock

    def progressed(self) -> None:
        self.blocks += 1
        self.last_progress = self.clock()
        if self.reason is not None:
            raise TransferAborted(self.reason)

    def abort(self, reason: str) -> None:
        """Stop the transfer: a read blocked on its socket returns at once."""
        with self._lock:
            if self.reason is None:
                self.reason = reason
            sock, self._sock = self._sock, None
        if sock is not None:
            try:  # the plain socket's shutdown, also under TLS: wake the reader, never touch its SSL state
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


class ConnectionPool:
    """Kept-alive HTTP connections per origin, shared by the worker threads."""

    def __init__(self, timeout: float, ca_file: str | None = None) -> None:
        self.timeout = timeout
        self._ca_file = ca_file
        self._ssl: ssl.SSLContext | None = None
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:  # the CA bundle httpx uses on the control plane (certifi), or the one given
            cafile = self._ca_file
            if cafile is None:
                try:
                    import certifi
                    cafile = certifi.where()
                except ImportError:  # pragma: no cover - httpx depends on certifi
                    cafile = None
            self._ssl = ssl.create_default_context(cafile=cafile)
        return self._ssl

    def get(self, scheme: str, host: str, port: int) -> http.client.HTTPConnection:
        with self._lock:
            idle = self._idle.get((scheme, host, port))
            if idle:
                return idle.pop()
        return self._connect(scheme, host, port)

    def _connect(self, scheme: str, host: str, port: int) -> http.client.HTTPConnection:
        proxy = _proxy_for(scheme, host)
        if scheme == "https":
            if proxy:
                conn = http.client.HTTPSConnection(proxy[0], proxy[1], timeout=self.timeout, context=self._context())
                conn.set_tunnel(host, port)
                return conn
            return http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._context())
        if proxy:
            return _ProxiedConnection(proxy[0], proxy[1], timeout=self.timeout)
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def put(self, scheme: str, host: str, port: int, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault((scheme, host, port), [])
            if len(idle) < IDLE_PER_ORIGIN:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


class _ProxiedConnection(http.client.HTTPConnection):
    """A connection to a plain-HTTP proxy, which takes the whole URL in the request line."""


class HttpRanges:
    """Ranges read with ``http.client`` on worker threads, over kept-alive connections (the
    data plane's :class:`~.protocol.RangeReader`). ``timeout``: the socket timeout of each
    connect and read (a server that trickles is the watchdog's business, not this one's)."""

    def __init__(self, timeout: float, ca_file: str | None = None) -> None:
        self.pool = ConnectionPool(timeout, ca_file)

    def read_range(self, location: BlobLocation, start: int, lengths: Sequence[int],
                   on_block: Callable[[int, memoryview], None], transfer: Transfer, what: str,
                   new_buffer: Callable[[int], memoryview]) -> None:
        read_range(self.pool, location, start, lengths, on_block, transfer, what, new_buffer)

    def close(self) -> None:
        self.pool.close()


def _proxy_for(scheme: str, host: str) -> tuple[str, int] | None:
    """The proxy the environment names for this URL (HTTP_PROXY, HTTPS_PROXY, NO_PROXY), as
    httpx honours them on the control plane."""
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme) or proxies.get("all")
    if not url or urllib.request.proxy_bypass(host):  # NO_PROXY, from the environment as on Linux
        return None
    parts = urlsplit(url if "://" in url else "http://" + url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def read_range(pool: ConnectionPool, location: BlobLocation, start: int, lengths: Sequence[int],
               on_block: Callable[[int, memoryview], None], transfer: Transfer, what: str,
               new_buffer: Callable[[int], memoryview] = lambda size: memoryview(bytearray(size))) -> None:
    """GET bytes ``start`` .. ``start + sum(lengths)`` of the blob at ``location`` and hand each
    block, in its own new buffer (from ``new_buffer``), to ``on_block(position, buffer)`` in this
    thread as soon as it is complete. Raises on anything short of exactly the bytes asked for."""
    parts = urlsplit(location.url)
    scheme = parts.scheme
    host = parts.hostname or ""
    port = parts.port or (443 if scheme == "https" else 80)
    end = start + sum(lengths)
    headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity", "User-Agent": "modelfs/0.1"}
    authorization = location.owner.allow(location.url, location.authorization)
    if authorization:
        headers["Authorization"] = authorization
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    response, conn = _send(pool, location, scheme, host, port, target, headers, transfer, what)
    reusable = False
    try:
        reusable = receive_range(response, start, lengths, on_block, transfer, what, location, new_buffer)
    finally:
        transfer.attach(None)
        if reusable:
            pool.put(scheme, host, port, conn)
        else:
            conn.close()


def _send(pool: ConnectionPool, location: BlobLocation, scheme: str, host: str, port: int, target: str,
          headers: dict[str, str], transfer: Transfer, what: str
          ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
    """Send the GET; a kept-alive connection the server closed meanwhile is replaced once."""
    for fresh in (False, True):
        conn = pool._connect(scheme, host, port) if fresh else pool.get(scheme, host, port)
        try:
            conn.request("GET", location.url if isinstance(conn, _ProxiedConnection) else target, headers=headers)
            transfer.attach(conn.sock)
            response = conn.getresponse()
            return response, conn
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
            conn.close()
            transfer.attach(None)
            if fresh or transfer.reason is not None:
                raise ConnectionLostError(f"{what}: {location.source} closed the connection: {exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            transfer.attach(None)
            if transfer.reason is not None:
                raise TransferAborted(transfer.reason) from None
            raise ConnectionLostError(f"{what}: cannot read from {location.source}: {exc or type(exc).__name__}") from None
        except BaseException:
            conn.close()
            raise
    raise AssertionError("unreachable")


class RangeResponse(Protocol):
    """What :func:`receive_range` reads of an answer: ``http.client.HTTPResponse``'s members
    (the fake registry of the tests answers with its own)."""

    status: int
    reason: str
    length: int | None
    will_close: bool

    def getheader(self, name: str) -> str | None: ...

    def readinto(self, buffer: bytearray | memoryview) -> int: ...

    def read(self, amt: int) -> bytes: ...


def receive_range(response: RangeResponse, start: int, lengths: Sequence[int],
                  on_block: Callable[[int, memoryview], None], transfer: Transfer, what: str,
                  location: BlobLocation, new_buffer: Callable[[int], memoryview]) -> bool:
    """The answer to a GET of bytes ``start .. start + sum(lengths)``: its status checked, then
    its blocks read into ``on_block``; True if the connection may be used again. A connection
    that fails mid-body is a :class:`ConnectionLostError`, or :class:`TransferAborted` when
    another thread stopped the transfer."""
    end = start + sum(lengths)
    try:
        return _read_body(response, start, end, lengths, on_block, transfer, what, location, new_buffer)
    except (OSError, http.client.HTTPException) as exc:
        if transfer.reason is not None:
            raise TransferAborted(transfer.reason) from None
        raise ConnectionLostError(f"{what}: connection to {location.source} lost: {exc or type(exc).__name__}") from None


def _read_body(response: RangeResponse, start: int, end: int, lengths: Sequence[int],
               on_block: Callable[[int, memoryview], None], transfer: Transfer, what: str,
               location: BlobLocation, new_buffer: Callable[[int], memoryview]) -> bool:
    """Check the status, then read the blocks; True if the connection may be used again."""
    status = response.status
    if status in (301, 302, 303, 307, 308) and response.getheader("Location"):
        raise LocationMoved(f"{what}: {location.source} redirected the range",
                            urljoin(location.url, response.getheader("Location") or ""))
    if status in (400, 401, 403, 404, 410) or 300 <= status < 400:
        raise LocationRejected(f"{what}: {location.source} answered {status} {response.reason} for its location")
    if status in (408, 429) or status >= 500:
        raise RangeRefused(f"{what}: {location.source} answered {status} {response.reason}",
                           _retry_after(response.getheader("Retry-After")))
    if status == 206:
        content_range = response.getheader("Content-Range") or ""
        if not content_range.startswith(f"bytes {start}-{end - 1}/"):
            raise WrongRange(f"{what}: {location.source} answered range {content_range!r}, asked {start}-{end - 1}")
        skip = 0
    elif status == 200:  # Range ignored (a pull-through cache still filling): read past the start, cut at the end
        skip = start
    else:
        raise RegistryError(f"{what}: {location.source} answered {status} {response.reason}")
    if response.length is not None and response.length != (end - start) + skip and status == 206:
        raise IntegrityError(f"{what}: {location.source} announced {response.length} bytes for a range of {end - start}")
    while skip:
        scratch = bytearray(min(skip, 1 << 20))
        got = response.readinto(scratch)
        if not got:
            raise ConnectionLostError(f"{what}: response from {location.source} ended before byte {start}")
        skip -= got
    for position, length in enumerate(lengths):
        block = new_buffer(length)
        view = block
        fill = 0
        while fill < length:
            got = response.readinto(view[fill:])
            if not got:
                if transfer.reason is not None:
                    raise TransferAborted(transfer.reason)
                raise ConnectionLostError(f"{what}: response from {location.source} ended after "
                                          f"{sum(lengths[:position]) + fill} of {end - start} bytes")
            fill += got
        transfer.progressed()
        on_block(position, block)
    if status == 200:
        return False  # the rest of the blob is still on the wire
    if (response.length is None or response.length) and response.read(1):  # chunked or close-delimited: must end here
        raise IntegrityError(f"{what}: {location.source} sent more than the {end - start} bytes asked")
    return not response.will_close
