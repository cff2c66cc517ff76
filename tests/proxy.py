"""A loopback TCP proxy that counts the bytes the registry sends, for tests and benchmarks.

Threads, not trio: the test process blocks in plain file reads on a FUSE mount while the
proxy must keep forwarding, so it cannot share the test's event loop.
"""

from __future__ import annotations

import socket
import threading


class CountingProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.downstream_bytes = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._stopping = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.downstream_bytes = 0

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        pipe(source, sink, self._counted if count else None)
        for sock in (source, sink):
            sock.close()

    def _counted(self, size: int) -> None:
        with self._lock:
            self.downstream_bytes += size

    def close(self) -> None:
        self._stopping = True
        stop_listening(self._server)


def pipe(source: socket.socket, sink: socket.socket, counted=None) -> None:
    """Bytes from ``source`` to ``sink`` until either end closes (each told of the bytes, if
    ``counted``); then both shut down, so the other direction's pipe ends too."""
    try:
        while data := source.recv(1 << 20):
            sink.sendall(data)
            if counted:
                counted(len(data))
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def stop_listening(server: socket.socket) -> None:
    """Stop listening now: later connections are refused (a thread blocked in accept() would
    keep a merely closed socket listening until its next connection)."""
    try:
        server.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    server.close()
