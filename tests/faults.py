"""A fault-injecting HTTP proxy between modelfs and the real registry (loopback, bounded).

Blob GETs can be answered with any status code at once (``"503"``, ``"404"``; 429 with
Retry-After; 401 with ``challenge`` as its WWW-Authenticate, any realm), a stall, a connection
reset, a truncated body, one flipped byte, a trickle (the body at ``trickle_rate`` bytes a
second, for at most ``trickle_seconds``), the head of the answer a byte at a time
(``trickle-head``: headers never complete, no read timeout trips; for at most
``trickle_seconds``), or the whole blob with 200 (``norange``: the Range header is dropped on
the way, as some servers and filling pull-through caches do). Faults come from ``by_range``
(the fault for a blob GET with that exact Range header, such as the 1-byte location probe
``bytes=0-0``), then a queue (one per blob GET) or a ``persistent`` setting; ``only`` limits
them to blob GETs whose path contains that string. Manifest GETs can be gzip-encoded
(``manifests = "gzip"``, the real manifest) or answered with a gzip bomb (``"bomb"``:
``bomb_size`` bytes of zeros inflated from about a thousandth of that). Everything else is
forwarded untouched.
"""

from __future__ import annotations

import functools
import gzip
import socket
import struct
import threading
import time
import zlib
from collections import Counter

from proxy import stop_listening


@functools.lru_cache(maxsize=2)
def gzip_bomb(size: int, piece: int = 1 << 20) -> bytes:
    """A valid gzip stream of ``size`` zero bytes (a multiple of ``piece``), built without
    holding them: one fully flushed deflate segment of ``piece`` zeros, repeated (1 GiB: 1 MB)."""
    zeros = bytes(piece)
    segment = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = segment.compress(zeros) + segment.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(size // piece):
        crc = zlib.crc32(zeros, crc)
    end = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return header + block * (size // piece) + end + struct.pack("<II", crc, size & 0xFFFFFFFF)


class FaultProxy:
    def __init__(self, upstream_port: int, stall_seconds: float = 2.0) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.faults: list[str] = []
        self.persistent: str | None = None
        self.stall_seconds = stall_seconds
        self.trickle_rate = 2048
        self.trickle_seconds = 20.0
        self.only: str | None = None
        self.by_range: dict[str, str] = {}  # Range header -> fault, before the queue and ``persistent``
        self.challenge = 'Bearer realm="http://{proxy}/token",service="faulty"'  # a 401's WWW-Authenticate
        self.manifests: str | None = None  # "gzip" or "bomb"
        self.bomb_size = 1 << 30
        self.injected: Counter[str] = Counter()
        self.faulted_ranges: Counter[str] = Counter()  # how often each Range header met a fault
        self.blob_requests = 0
        self.requests: list[tuple[str, str]] = []  # (path, Range header) of every blob GET, in arrival order
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        stop_listening(self._server)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _next_fault(self, method: str, path: str, asked: str) -> str | None:
        if method != "GET" or "/blobs/" not in path or (self.only and self.only not in path):
            return None
        with self._lock:
            self.blob_requests += 1
            self.requests.append((path, asked))
            fault = self.by_range.get(asked) or self.persistent or (self.faults.pop(0) if self.faults else None)
            if fault:
                self.injected[fault] += 1
            return fault

    def _serve(self, client: socket.socket) -> None:
        reader = client.makefile("rb")
        try:
            while True:
                head = _read_head(reader)
                if head is None:
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                asked = next((line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("range:")), "")
                fault = self._next_fault(method, path, asked)
                if fault:
                    with self._lock:
                        self.faulted_ranges[asked] += 1
                if fault and fault.isdigit():
                    extra = {"429": "Retry-After: 1\r\n",
                             "401": f"WWW-Authenticate: {self.challenge.format(proxy=self.address)}\r\n"}.get(fault, "")
                    client.sendall(f"HTTP/1.1 {fault} Injected\r\nContent-Length: 0\r\n{extra}\r\n".encode())
                    continue
                if method == "GET" and "/manifests/" in path and self.manifests:
                    self._encoded_manifest(client, lines)
                    return
                if fault == "stall":
                    time.sleep(self.stall_seconds)
                if fault == "reset":
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                dropped = ("connection:", "range:") if fault == "norange" else ("connection:",)
                headers = [line for line in lines[1:] if line and not line.lower().startswith(dropped)]
                request = "\r\n".join([lines[0], *headers, "Connection: close", "", ""]).encode()
                if not self._forward(client, request, method, fault):
                    return
        except OSError:
            return
        finally:
            reader.close()
            client.close()

    def _forward(self, client: socket.socket, request: bytes, method: str, fault: str | None) -> bool:
        with socket.create_connection(self.upstream) as upstream:
            upstream.sendall(request)
            upstream_reader = upstream.makefile("rb")
            head = _read_head(upstream_reader)
            if head is None:
                return False
            length = 0
            for line in head.decode("latin-1").split("\r\n")[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            head = head.replace(b"Connection: close\r\n", b"")
            if fault == "trickle-head":  # bounded: drops the connection after trickle_seconds
                deadline = time.monotonic() + self.trickle_seconds
                for i in range(len(head)):
                    if time.monotonic() > deadline:
                        return False
                    client.sendall(head[i:i + 1])
                    time.sleep(0.2)
            else:
                client.sendall(head)
            if method == "HEAD":
                return True
            body = upstream_reader.read(length)
            if fault == "truncate":
                client.sendall(body[: len(body) // 2])
                return False
            if fault == "trickle":  # bounded: stops (and drops the connection) after trickle_seconds
                deadline = time.monotonic() + self.trickle_seconds
                step = max(1, self.trickle_rate // 10)
                for start in range(0, len(body), step):
                    if time.monotonic() > deadline:
                        return False
                    client.sendall(body[start:start + step])
                    time.sleep(0.1)
                return True
            if fault == "flip" and body:
                flipped = bytearray(body)
                flipped[len(body) // 2] ^= 0x01
                body = bytes(flipped)
            client.sendall(body)
            return True


    def _encoded_manifest(self, client: socket.socket, lines: list[str]) -> None:
        """Answer a manifest GET with a gzip-encoded body, whatever Accept-Encoding said."""
        with self._lock:
            self.injected[f"manifest-{self.manifests}"] += 1
        if self.manifests == "bomb":
            body, kind = gzip_bomb(self.bomb_size), "application/vnd.oci.image.manifest.v1+json"
        else:
            headers = [line for line in lines[1:] if line and not line.lower().startswith("connection:")]
            with socket.create_connection(self.upstream) as upstream:
                upstream.sendall("\r\n".join([lines[0], *headers, "Connection: close", "", ""]).encode())
                reader = upstream.makefile("rb")
                head = (_read_head(reader) or b"").decode("latin-1").split("\r\n")
                length = next(int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length:"))
                kind = next(h.split(":", 1)[1].strip() for h in head if h.lower().startswith("content-type:"))
                body = gzip.compress(reader.read(length))
        client.sendall(f"HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Encoding: gzip\r\n"
                       f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)


def _read_head(reader) -> bytes | None:
    head = b""
    while True:
        line = reader.readline(65536)
        if not line:
            return None
        head += line
        if line in (b"\r\n", b"\n"):
            return head
