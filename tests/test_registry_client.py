"""Client behaviour a real registry cannot be made to show on demand: redirects to another
host (as S3-backed registries do), retries on 5xx/429. Servers here are tiny loopback
HTTP servers; everything else in the suite talks to real Distribution."""

from __future__ import annotations

import contextlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from modelfs.credentials import Credential
from modelfs.errors import AuthenticationError, RegistryError
from modelfs.registry import RegistryClient, RetryPolicy
from modelfs.retry import BRIEF_RETRY

BLOB = bytes(range(256)) * 64
DIGEST = "sha256:" + __import__("hashlib").sha256(BLOB).hexdigest()


class Recorder(BaseHTTPRequestHandler):
    seen: list[dict]
    script: list[tuple[int, dict, bytes]]

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append(dict(self.headers))
        status, headers, body = self.script.pop(0) if self.script else self.default()
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def default(self) -> tuple[int, dict, bytes]:
        start, end = self.headers["Range"].removeprefix("bytes=").split("-")
        part = BLOB[int(start):int(end) + 1]
        return 206, {"Content-Range": f"bytes {start}-{end}/{len(BLOB)}"}, part


def serve(host: str, script: list) -> tuple[ThreadingHTTPServer, list[dict]]:
    seen: list[dict] = []
    handler = type("Handler", (Recorder,), {"seen": seen, "script": script})
    server = ThreadingHTTPServer((host, 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


async def test_redirect_keeps_range_and_drops_authorization_across_hosts():
    try:
        blobs, blob_seen = serve("127.0.0.2", [])
    except OSError:
        pytest.skip("127.0.0.2 is not routable here")
    location = f"http://127.0.0.2:{blobs.server_address[1]}/bucket/blob?sig=abc"
    front, front_seen = serve("127.0.0.1", [
        (401, {"WWW-Authenticate": 'Basic realm="test"'}, b""),
        (307, {"Location": location}, b""),
    ])
    registry = f"127.0.0.1:{front.server_address[1]}"
    async with RegistryClient(registry, plain_http=True) as client:
        client.use_credential(Credential("alice", "s3cret-pass"))
        async with client.stream_blob("org/model", DIGEST, 1000, 3000) as response:
            data = b"".join([chunk async for chunk in response.aiter_raw()])
    assert data == BLOB[1000:3000]
    assert front_seen[1]["Authorization"].startswith("Basic ")
    assert blob_seen[0]["Range"] == "bytes=1000-2999"
    assert "Authorization" not in blob_seen[0]
    front.shutdown()
    blobs.shutdown()


async def test_retries_5xx_and_429_then_gives_a_clear_error():
    script = [(503, {}, b""), (429, {"Retry-After": "0"}, b"")]  # then the default 206
    server, seen = serve("127.0.0.1", script)
    registry = f"127.0.0.1:{server.server_address[1]}"
    async with RegistryClient(registry, plain_http=True, retry=RetryPolicy(base_delay=0.01)) as client:
        async with client.stream_blob("org/model", DIGEST, 0, 10) as response:
            assert b"".join([c async for c in response.aiter_raw()]) == BLOB[:10]
    assert len(seen) == 3
    script.extend([(500, {}, b'{"errors":[{"code":"UNKNOWN","message":"disk on fire"}]}')] * 3)
    async with RegistryClient(registry, plain_http=True, retry=RetryPolicy(attempts=3, base_delay=0.01)) as client:
        with pytest.raises(RegistryError) as info:
            await client.get_blob("org/model", DIGEST)
    assert "500" in str(info.value) and "disk on fire" in str(info.value) and "3 attempts" in str(info.value)
    server.shutdown()


HUGE = b"{" + b" " * (9 << 20) + b"}"


@pytest.mark.parametrize("script, call", [
    ([(200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, HUGE)],
     lambda client: client.get_manifest("org/model", "v1")),
    ([(401, {"WWW-Authenticate": 'Bearer realm="{realm}",service="test"'}, b""), (200, {}, HUGE)],
     lambda client: client.get_manifest("org/model", "v1")),
    ([(404, {"Content-Type": "application/json"}, HUGE)], lambda client: client.get_blob("org/model", DIGEST)),
    ([(500, {}, HUGE)] * 2, lambda client: client.get_manifest("org/model", "v1")),
], ids=["manifest", "token", "blob-error", "server-error"])
async def test_oversized_answers_are_refused_not_held(script, call):
    """A hostile or broken server cannot make the client hold gigabytes (Distribution caps
    manifests at 4 MiB); blobs themselves are streamed and never read whole."""
    server, seen = serve("127.0.0.1", script)
    registry = f"127.0.0.1:{server.server_address[1]}"
    for i, (status, headers, body) in enumerate(script):
        script[i] = (status, {k: v.replace("{realm}", f"http://{registry}/token") for k, v in headers.items()}, body)
    try:
        async with RegistryClient(registry, plain_http=True, retry=RetryPolicy(attempts=2, base_delay=0.01)) as client:
            with pytest.raises(RegistryError) as info:
                await call(client)
        assert f"{registry} sent over 8388608 bytes in answer to GET" in str(info.value), str(info.value)
        assert all(headers.get("Accept-Encoding") == "identity" for headers in seen)
    finally:
        server.shutdown()


async def test_brief_retries_give_up_after_two_attempts_inside_their_block_only():
    script = [(503, {}, b"")] * 3  # then the default 206
    server, seen = serve("127.0.0.1", script)
    registry = f"127.0.0.1:{server.server_address[1]}"
    try:
        async with RegistryClient(registry, plain_http=True, retry=RetryPolicy(base_delay=0.01)) as client:
            with pytest.raises(RegistryError, match=r"503 .*\(gave up after 2 attempts\)"):
                await client.get_blob("org/model", DIGEST, retry=BRIEF_RETRY)
            async with client.stream_blob("org/model", DIGEST, 0, 10) as response:  # patient again: 503, then 206
                assert b"".join([c async for c in response.aiter_raw()]) == BLOB[:10]
        assert len(seen) == 4
    finally:
        server.shutdown()


async def test_authorization_is_not_sent_over_a_downgrade_to_plain_http():
    """An https -> http redirect on the same host and port would put the credentials on the
    wire in clear text: the scheme is part of where they may go. No real server answers TLS
    and plain HTTP on one port, so an in-process transport plays the registry here."""
    import httpx
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.scheme == "https" and "authorization" not in request.headers:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="test"'})
        if request.url.scheme == "https":
            return httpx.Response(307, headers={"Location": f"http://{request.url.netloc.decode()}/blob"})
        return httpx.Response(206, stream=httpx.ByteStream(BLOB[:100]),
                              headers={"Content-Range": f"bytes 0-99/{len(BLOB)}"})

    async with RegistryClient("registry.test", transport=httpx.MockTransport(answer)) as client:
        client.use_credential(Credential("alice", "s3cret-pass"))
        async with client.stream_blob("org/model", DIGEST, 0, 100) as response:
            assert b"".join([chunk async for chunk in response.aiter_raw()]) == BLOB[:100]
    assert seen[1].headers["authorization"].startswith("Basic ")
    assert seen[2].url.scheme == "http" and "authorization" not in seen[2].headers


async def test_credentials_go_only_to_the_registrys_origin_and_a_401_elsewhere_is_a_refusal():
    """An upload location on another origin (storage, as a redirect target is) gets neither
    the bearer token nor the password, and its 401 naming itself as realm is a refusal: no
    token is fetched from it. The registry's own realm on another host is fine (Docker Hub's
    token service is): the rule is about who asks."""
    import httpx

    from modelfs.registry.ranges import LocationRejected
    seen: list[httpx.Request] = []

    def unread(status: int, headers: dict[str, str], body: bytes = b"") -> httpx.Response:
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))  # as from the network

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        host = request.url.host
        if host == "auth.registry.test":  # the registry's token service, named by the registry
            return unread(200, {}, b'{"token": "registry-token"}')
        if host == "storage.test" and request.url.path == "/token":
            return unread(200, {}, b'{"token": "storage-token"}')
        if host == "storage.test":
            return unread(401, {"WWW-Authenticate": 'Bearer realm="https://storage.test/token"'})
        if request.headers.get("authorization") != "Bearer registry-token":
            return unread(401, {"WWW-Authenticate": 'Bearer realm="https://auth.registry.test/token"'})
        return unread(202, {"Location": "https://storage.test/upload/1?state=x"})

    async with RegistryClient("registry.test", transport=httpx.MockTransport(answer)) as client:
        client.use_credential(Credential("alice", "s3cret-pass"))
        with pytest.raises(RegistryError) as refused:
            await client.upload_blob("org/model", DIGEST, 3, lambda: b"abc")
    token_fetch = next(r for r in seen if r.url.host == "auth.registry.test")
    assert token_fetch.headers["authorization"].startswith("Basic ")
    elsewhere = [r for r in seen if r.url.host == "storage.test"]
    assert elsewhere and all("authorization" not in r.headers for r in elsewhere)
    assert [r.url.path for r in elsewhere] == ["/upload/1"]  # no token fetch from storage's realm
    assert isinstance(refused.value, LocationRejected)
    assert str(refused.value) == ("storage.test, where registry.test sent the request for upload of "
                                  f"{DIGEST}, refused it (HTTP 401)")


async def test_a_tls_registry_naming_a_plain_http_realm_never_gets_the_password_in_clear():
    import httpx
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="http://auth.registry.test/token"'},
                              stream=httpx.ByteStream(b""))

    async with RegistryClient("registry.test", transport=httpx.MockTransport(answer)) as client:
        client.use_credential(Credential("alice", "s3cret-pass"))
        with pytest.raises(AuthenticationError, match="without TLS .*refusing to send the credentials there in clear"):
            await client.get_manifest("org/model", "v1")
    assert [r.url.host for r in seen] == ["registry.test"]


def _trickling_server() -> tuple[object, str]:
    """A registry whose token service (on its own origin) answers its headers a byte every
    0.2 s, for 10 s at most: no read timeout ever trips."""
    import socket
    import time

    server = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{server.getsockname()[1]}"

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the client hung up: it gave up, as it should
            request = conn.recv(65536).decode("latin-1")
            if " /token" in request.split("\r\n", 1)[0]:
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
                deadline = time.monotonic() + 10
                for i in range(len(head)):
                    if time.monotonic() > deadline:
                        return
                    conn.sendall(head[i:i + 1])
                    time.sleep(0.2)
                conn.sendall(b'{"token": "t"} ')
                return
            conn.sendall(f'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm="http://{address}/token"\r\n'
                         "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server, address


async def test_a_trickling_token_fetch_is_given_up_at_the_requests_deadline():
    """The deadline is over the whole request, the token fetch behind its 401 included: a
    token service answering a byte at a time cannot hold the caller past it."""
    import trio

    from modelfs.errors import UnavailableError
    from modelfs.retry import ONE_ATTEMPT
    server, address = _trickling_server()
    try:
        async with RegistryClient(address, plain_http=True, retry=RetryPolicy(deadline=1.0)) as client:
            started = trio.current_time()
            with trio.fail_after(6), pytest.raises(UnavailableError, match="within 1s"):
                await client.locate_blob("org/model", DIGEST, retry=ONE_ATTEMPT)
            assert trio.current_time() - started < 2.5
    finally:
        server.close()  # type: ignore[attr-defined]


async def test_an_encoded_answer_is_inflated_within_the_cap_and_a_blob_is_never_inflated():
    """We ask for identity; a server that gzips anyway gets its manifest inflated, never past
    the cap (a bomb is refused after 8 MiB of output, not held whole), an encoding we do not
    decode is refused, and a blob body stays the raw bytes that came (they fail the digest)."""
    import gzip

    import httpx

    from modelfs.errors import IntegrityError
    manifest = b'{"schemaVersion": 2}'
    bomb = gzip.compress(bytes(64 << 20), compresslevel=1)
    answers = {"/v2/org/model/manifests/small": (gzip.compress(manifest), "gzip"),
               "/v2/org/model/manifests/bomb": (bomb, "gzip"),
               "/v2/org/model/manifests/brotli": (b"\x0b\x02\x80{}\x03", "br"),
               f"/v2/org/model/blobs/{DIGEST}": (gzip.compress(BLOB), "gzip")}

    def answer(request: httpx.Request) -> httpx.Response:
        body, encoding = answers[request.url.path]
        return httpx.Response(200, stream=httpx.ByteStream(body),  # unread, as from the network
                              headers={"Content-Encoding": encoding, "Content-Type": "application/json"})

    async with RegistryClient("registry.test", transport=httpx.MockTransport(answer)) as client:
        data, _, digest = await client.get_manifest("org/model", "small")
        assert data == manifest and digest == "sha256:" + __import__("hashlib").sha256(manifest).hexdigest()
        with pytest.raises(RegistryError, match=r"^registry.test sent over 8388608 bytes \(inflated from gzip\) in "
                                                r"answer to GET /v2/org/model/manifests/bomb; refusing it$"):
            await client.get_manifest("org/model", "bomb")
        with pytest.raises(RegistryError, match=r"as 'br', which modelfs does not decode"):
            await client.get_manifest("org/model", "brotli")
        async with client.stream_blob("org/model", DIGEST) as body:
            assert b"".join([chunk async for chunk in body.aiter_raw()]) == gzip.compress(BLOB)
        with pytest.raises(IntegrityError):
            await client.get_blob("org/model", DIGEST)
