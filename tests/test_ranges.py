"""The data path's HTTP (``modelfs.registry.ranges``): what a real registry cannot be made to
show on demand, against tiny loopback servers. The worker-thread code runs here as it runs
in the daemon, in threads."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from modelfs.errors import ConnectionLostError, IntegrityError, RegistryError
from modelfs.registry.origin import Origin
from modelfs.registry.ranges import (
    BlobLocation,
    ConnectionPool,
    LocationMoved,
    LocationRejected,
    RangeRefused,
    Transfer,
    TransferAborted,
    read_range,
)
from modelfs.storage.direct import DIRECT_ALIGNMENT, aligned_buffer

BLOB = hashlib.sha256(b"seed").digest() * 4096  # 128 KiB
BLOCK = 16 * 1024


class Blob(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as registries answer
    seen: list[dict]
    connections: set
    script: list

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append(dict(self.headers))
        self.connections.add(self.client_address)
        action = self.script.pop(0) if self.script else "range"
        if callable(action):
            action(self)
            return
        start, end = (int(x) for x in self.headers["Range"].removeprefix("bytes=").split("-"))
        if action == "whole":
            self._send(200, {}, BLOB)
        elif action == "short":
            self._send(206, {"Content-Range": f"bytes {start}-{end}/{len(BLOB)}"}, BLOB[start:end + 1],
                       length=end + 1 - start, cut=(end + 1 - start) // 2)
        elif action == "wrong-range":
            self._send(206, {"Content-Range": f"bytes 0-{end - start}/{len(BLOB)}"}, BLOB[:end + 1 - start])
        else:
            self._send(206, {"Content-Range": f"bytes {start}-{end}/{len(BLOB)}"}, BLOB[start:end + 1])

    def _send(self, status: int, headers: dict, body: bytes, length: int | None = None, cut: int | None = None) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.close_connection = True


@pytest.fixture
def server():
    seen: list[dict] = []
    connections: set = set()
    script: list = []
    handler = type("Handler", (Blob,), {"seen": seen, "connections": connections, "script": script})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.handle_error = lambda request, address: None  # a client that stopped reading, on purpose
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    httpd.seen, httpd.connections, httpd.script = seen, connections, script  # type: ignore[attr-defined]
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/v2/r/blobs/sha256:x"  # type: ignore[attr-defined]
    yield httpd
    httpd.shutdown()


def empty_answer(status: int, headers: dict[str, str]):
    """A scripted answer with no body: a status and its headers."""
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return answer


def location(url: str, authorization: str | None = None, redirected: bool = False) -> BlobLocation:
    return BlobLocation(url, authorization, "test", time.monotonic() + 60, redirected, owner=Origin.of(url))


def fetch(pool: ConnectionPool, where: BlobLocation, start: int, blocks: int, transfer: Transfer | None = None,
          buffers=aligned_buffer) -> list[bytes]:
    got: list[bytes] = []
    read_range(pool, where, start, [BLOCK] * blocks, lambda i, data: got.append(bytes(data)),
               transfer or Transfer(), "blob", buffers)
    return got


def test_blocks_arrive_whole_in_order_in_aligned_buffers(server):
    pool = ConnectionPool(5)
    buffers: list[memoryview] = []

    def sink(position: int, data: memoryview) -> None:
        buffers.append(data)

    read_range(pool, location(server.url, "Bearer t"), BLOCK, [BLOCK] * 3, sink, Transfer(), "blob", aligned_buffer)
    assert [bytes(b) for b in buffers] == [BLOB[i * BLOCK:(i + 1) * BLOCK] for i in (1, 2, 3)]
    assert all(__import__("ctypes").addressof(__import__("ctypes").c_char.from_buffer(b)) % DIRECT_ALIGNMENT == 0
               for b in buffers)
    assert server.seen[0]["Range"] == f"bytes={BLOCK}-{4 * BLOCK - 1}"
    assert server.seen[0]["Authorization"] == "Bearer t"
    pool.close()


def test_a_kept_alive_connection_is_used_again(server):
    pool = ConnectionPool(5)
    for start in (0, BLOCK, 2 * BLOCK):
        assert fetch(pool, location(server.url), start, 1) == [BLOB[start:start + BLOCK]]
    assert len(server.connections) == 1
    pool.close()


def test_a_server_ignoring_range_is_read_past_the_start_and_cut_at_the_end(server):
    server.script.append("whole")
    pool = ConnectionPool(5)
    assert fetch(pool, location(server.url), 2 * BLOCK, 2) == [BLOB[2 * BLOCK:3 * BLOCK], BLOB[3 * BLOCK:4 * BLOCK]]
    assert fetch(pool, location(server.url), 0, 1) == [BLOB[:BLOCK]]  # the rest of that body is not read as this one
    pool.close()


def test_a_body_cut_short_is_an_error_naming_how_far_it_got(server):
    server.script.append("short")
    with pytest.raises(ConnectionLostError, match=f"ended after {2 * BLOCK} of {4 * BLOCK} bytes"):
        fetch(ConnectionPool(5), location(server.url), 0, 4)


def test_a_content_range_other_than_asked_is_refused(server):
    server.script.append("wrong-range")
    with pytest.raises(RegistryError, match="answered range 'bytes 0-"):
        fetch(ConnectionPool(5), location(server.url), BLOCK, 1)


@pytest.mark.parametrize(("status", "error"), [(401, LocationRejected), (403, LocationRejected),
                                                (404, LocationRejected), (503, RangeRefused), (429, RangeRefused)])
def test_status_codes_say_whether_to_resolve_again_or_retry(server, status, error):
    server.script.append(empty_answer(status, {"Retry-After": "3"}))
    with pytest.raises(error) as raised:
        fetch(ConnectionPool(5), location(server.url), 0, 1)
    if error is RangeRefused:
        assert raised.value.retry_after == 3.0


def test_a_redirect_is_reported_with_its_target_resolved_against_the_url(server):
    server.script.append(empty_answer(307, {"Location": "/storage/blob?X-Amz-Expires=60&sig=abc"}))
    with pytest.raises(LocationMoved) as moved:
        fetch(ConnectionPool(5), location(server.url), 0, 1)
    assert moved.value.url == server.url.split("/v2/")[0] + "/storage/blob?X-Amz-Expires=60&sig=abc"


def test_more_bytes_than_asked_on_an_unsized_body_are_refused(server):
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes 0-{BLOCK - 1}/{len(BLOB)}")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(BLOB[:BLOCK + 100])  # no length: the body ends when the connection does
        handler.close_connection = True

    server.script.append(answer)
    with pytest.raises(IntegrityError, match="more than"):
        fetch(ConnectionPool(5), location(server.url), 0, 1)


def test_abort_from_another_thread_ends_a_stalled_transfer_at_once():
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def stall() -> None:  # answers the head, then nothing: a server that stalls mid-body
        conn, _ = listener.accept()
        accepted.append(conn)
        conn.recv(65536)
        conn.sendall(f"HTTP/1.1 206 Partial\r\nContent-Range: bytes 0-{BLOCK - 1}/{len(BLOB)}\r\n"
                     f"Content-Length: {BLOCK}\r\n\r\n".encode() + BLOB[:100])

    threading.Thread(target=stall, daemon=True).start()
    transfer = Transfer()
    outcome: list[BaseException] = []

    def worker() -> None:
        try:
            fetch(ConnectionPool(60), location(f"http://127.0.0.1:{listener.getsockname()[1]}/b"), 0, 1, transfer)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive()  # stuck in the body, with a 60 s socket timeout
    started = time.monotonic()
    transfer.abort("no block arrived within 0.5s")
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - started < 1.0
    assert isinstance(outcome[0], TransferAborted) and "no block arrived" in str(outcome[0])
    listener.close()


def test_an_aborted_transfer_gives_no_block_it_had_not_finished(server):
    transfer = Transfer()
    got: list[int] = []

    def sink(position: int, data: memoryview) -> None:
        got.append(position)
        transfer.abort("unmounting")

    with pytest.raises(TransferAborted):
        read_range(ConnectionPool(5), location(server.url), 0, [BLOCK] * 4, sink, transfer, "blob", aligned_buffer)
    assert got == [0]


def test_authorization_goes_only_to_the_origin_it_belongs_to(server):
    """The worker applies the origin rule itself, where the request leaves: a location off the
    origin its credential belongs to (another port here) is read without it."""
    other = Origin.of("http://127.0.0.1:1")
    where = BlobLocation(server.url, "Basic YWxpY2U6czNjcmV0LXBhc3M=", "test", time.monotonic() + 60, owner=other)
    assert fetch(ConnectionPool(5), where, 0, 1) == [BLOB[:BLOCK]]
    assert "Authorization" not in server.seen[0]
    assert fetch(ConnectionPool(5), location(server.url, "Bearer t"), 0, 1) == [BLOB[:BLOCK]]
    assert server.seen[1]["Authorization"] == "Bearer t"


def test_an_encoded_range_is_delivered_as_the_raw_bytes_never_inflated(server):
    """A server that gzips a range anyway (we asked for identity) gets its raw bytes checked,
    and failing, as they are: nothing on the data path inflates them."""
    import gzip
    import os
    encoded = gzip.compress(os.urandom(2 * BLOCK))[:BLOCK]  # what the range's length says, gzip-encoded

    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes 0-{BLOCK - 1}/{len(BLOB)}")
        handler.send_header("Content-Encoding", "gzip")
        handler.send_header("Content-Length", str(len(encoded)))
        handler.end_headers()
        handler.wfile.write(encoded)

    server.script.append(answer)
    assert fetch(ConnectionPool(5), location(server.url), 0, 1) == [encoded]
