"""A hostile mirror on loopback: it serves chosen blobs with forged bytes under their real
digests (ranges included) and relays everything else to a real registry behind it, where a
forged block index matching the forged bytes can be attached. With ``challenge`` set it
answers every request with 401 and that ``WWW-Authenticate`` instead (any realm, itself
included), recording every ``Authorization`` it is sent in ``authorizations``. Threads, like
the other test proxies: the test blocks in reads on a FUSE mount while this must keep answering."""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import trio

_BLOB = re.compile(r"^/v2/.+/blobs/(sha256:[0-9a-f]{64})$")
_RELAYED = ("content-type", "docker-content-digest", "content-range", "location", "www-authenticate")


class HostileMirror:
    def __init__(self, upstream_port: int, forged: dict[str, bytes]) -> None:
        self.upstream = f"http://127.0.0.1:{upstream_port}"
        self.forged = forged
        self.forged_served = 0
        self.challenge: str | None = None
        self.challenged = 0
        self.authorizations: list[str] = []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                return None

            def do_GET(self) -> None:
                mirror._answer(self, "GET")

            def do_HEAD(self) -> None:
                mirror._answer(self, "HEAD")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> HostileMirror:
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, request: BaseHTTPRequestHandler, method: str) -> None:
        self.authorizations.extend(v for k, v in request.headers.items() if k.lower() == "authorization")
        if self.challenge:
            self.challenged += 1
            request.send_response(401)
            request.send_header("WWW-Authenticate", self.challenge)
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        match = _BLOB.match(request.path)
        if match and match.group(1) in self.forged:
            self._serve_forged(request, method, self.forged[match.group(1)])
            return
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("accept", "range")}
        response = httpx.request(method, self.upstream + request.path, headers=headers, timeout=30)
        request.send_response(response.status_code)
        for key in _RELAYED:
            if key in response.headers:
                request.send_header(key, response.headers[key])
        request.send_header("Content-Length", response.headers.get("content-length", str(len(response.content))))
        request.end_headers()
        if method == "GET":
            request.wfile.write(response.content)

    def _serve_forged(self, request: BaseHTTPRequestHandler, method: str, data: bytes) -> None:
        self.forged_served += 1
        start, end = 0, len(data) - 1
        ranged = re.match(r"bytes=(\d+)-(\d*)", request.headers.get("Range", ""))
        if ranged:
            start = int(ranged.group(1))
            end = min(int(ranged.group(2)) if ranged.group(2) else end, len(data) - 1)
            request.send_response(206)
            request.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            request.send_response(200)
        request.send_header("Content-Length", str(end - start + 1))
        request.send_header("Content-Type", "application/octet-stream")
        request.end_headers()
        if method == "GET":
            request.wfile.write(data[start:end + 1])

    def attach_forged_index(self, repository: str, manifest_digest: str, forged: dict[str, bytes]) -> None:
        """Attach, at the registry behind the mirror, an index matching the forged bytes."""
        from modelfs.formats import blockindex
        from modelfs.formats.spec import ARTIFACT_TYPE, OCI_MANIFEST, Descriptor
        from modelfs.index import attach as attach_referrer
        from modelfs.registry import RegistryClient
        hashes = {digest: [hashlib.sha256(data[i:i + (1 << 20)]).hexdigest() for i in range(0, len(data), 1 << 20)]
                  for digest, data in forged.items()}

        manifest = httpx.get(f"{self.upstream}/v2/{repository}/manifests/{manifest_digest}",
                             headers={"Accept": OCI_MANIFEST}).content

        async def attach() -> None:
            subject = Descriptor(OCI_MANIFEST, manifest_digest, len(manifest), artifact_type=ARTIFACT_TYPE)
            async with RegistryClient(self.upstream.removeprefix("http://"), plain_http=True) as client:
                await attach_referrer(client, repository, subject, blockindex.encode(1 << 20, hashes))

        trio.run(attach)
