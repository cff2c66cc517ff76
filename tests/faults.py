"""A fault-injecting HTTP proxy between modelfs and the real registry (loopback, bounded).

Blob GETs can be answered with 503, 429 (Retry-After), a stall, a connection reset, a
truncated body, one flipped byte, a trickle (the body at ``trickle_rate`` bytes a second,
for at most ``trickle_seconds``), or the whole blob with 200 (``norange``: the Range header
is dropped on the way, as some servers and filling pull-through caches do). Faults come from
a queue (one per blob GET) or from a ``persistent`` setting; ``only`` limits them to blob
GETs whose path contains that string. Everything else is forwarded untouched.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter


class FaultProxy:
    def __init__(self, upstream_port: int, stall_seconds: float = 2.0) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.faults: list[str] = []
        self.persistent: str | None = None
        self.stall_seconds = stall_seconds
        self.trickle_rate = 2048
        self.trickle_seconds = 20.0
        self.only: str | None = None
        self.injected: Counter[str] = Counter()
        self.faulted_ranges: Counter[str] = Counter()  # how often each Range header met a fault
        self.blob_requests = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _next_fault(self, method: str, path: str) -> str | None:
        if method != "GET" or "/blobs/" not in path or (self.only and self.only not in path):
            return None
        with self._lock:
            self.blob_requests += 1
            fault = self.persistent or (self.faults.pop(0) if self.faults else None)
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
                fault = self._next_fault(method, path)
                if fault:
                    asked = next((line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("range:")), "")
                    with self._lock:
                        self.faulted_ranges[asked] += 1
                if fault in ("503", "429"):
                    extra = "Retry-After: 1\r\n" if fault == "429" else ""
                    client.sendall(f"HTTP/1.1 {fault} Injected\r\nContent-Length: 0\r\n{extra}\r\n".encode())
                    continue
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


def _read_head(reader) -> bytes | None:
    head = b""
    while True:
        line = reader.readline(65536)
        if not line:
            return None
        head += line
        if line in (b"\r\n", b"\n"):
            return head
