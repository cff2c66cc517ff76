"""Client behaviour a real registry cannot be made to show on demand: redirects to another
host (as S3-backed registries do), retries on 5xx/429. Servers here are tiny loopback
HTTP servers; everything else in the suite talks to real Distribution."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from modelfs.credentials import Credential
from modelfs.errors import RegistryError
from modelfs.registry import RegistryClient, RetryPolicy, brief_retries

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
            with brief_retries(), pytest.raises(RegistryError, match=r"503 .*\(gave up after 2 attempts\)"):
                await client.get_blob("org/model", DIGEST)
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
