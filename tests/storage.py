"""A registry front that sends blob GETs to "blob storage" with presigned URLs that expire,
as S3- or CDN-backed registries do (Distribution's S3 driver, Harbor, ECR, Docker Hub).

The front relays everything to a real registry, except a blob GET, which it answers with
307 to a storage server on another port (another origin) once the registry accepted its
credentials. Storage serves ranges of the blob only while the URL has not expired (else 403,
"Request has expired", as S3 answers), and counts any ``Authorization`` sent to it: the
registry's credentials must never reach another origin. Set ``challenge`` and storage answers
blob GETs (of the digests in ``refused``, or all) with 401 and that ``WWW-Authenticate``,
naming itself as token realm (``{storage}`` in it is its URL), and serves tokens at
``/token``: whatever ``Authorization`` it is sent is recorded in ``storage_authorizations``.
Threads, like the other test proxies.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx

_BLOB = re.compile(r"^/v2/(.+)/blobs/(sha256:[0-9a-f]{64})$")
_RELAYED = ("content-type", "docker-content-digest", "content-range", "www-authenticate", "location")


def _server(answer) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            return None

        def do_GET(self) -> None:  # noqa: N802
            answer(self, "GET")

        def do_HEAD(self) -> None:  # noqa: N802
            answer(self, "HEAD")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def _reply(request: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes, method: str) -> None:
    request.send_response(status)
    for key, value in headers.items():
        request.send_header(key, value)
    if "content-length" not in (key.lower() for key in headers):
        request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    if method == "GET":
        request.wfile.write(body)


class PresigningFront:
    def __init__(self, upstream_port: int, ttl: float,
                 storage_auth: tuple[str, str] | Callable[[str], str] | None = None) -> None:
        self.upstream = f"http://127.0.0.1:{upstream_port}"
        self.ttl = ttl
        # what storage itself uses to read the registry: a user and password, or the
        # Authorization for a repository (a token of the registry's issuer)
        self.storage_auth = storage_auth
        self.redirects = 0
        self.expired_refusals = 0
        self.authorization_leaks = 0
        self.served_urls: set[str] = set()
        self.challenge: str | None = None
        self.refused: set[str] | None = None  # blob digests storage answers with 401 (None: all)
        self.storage_authorizations: list[str] = []  # every Authorization storage received, token fetches too
        self.challenged = 0  # blob GETs storage answered with 401
        self._front = _server(self._answer_front)
        self._storage = _server(self._answer_storage)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._front.server_address[1]}"

    def __enter__(self) -> PresigningFront:
        return self

    def __exit__(self, *exc: object) -> None:
        for server in (self._front, self._storage):
            server.shutdown()
            server.server_close()

    def _relay(self, request: BaseHTTPRequestHandler, method: str, path: str, keep: tuple[str, ...]) -> httpx.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() in keep}
        return httpx.request(method, self.upstream + path, headers=headers, timeout=30)

    def _answer_front(self, request: BaseHTTPRequestHandler, method: str) -> None:
        blob = _BLOB.match(request.path)
        if blob and method == "GET":  # the registry checks the credentials, then sends the client to storage
            checked = self._relay(request, "HEAD", request.path, ("authorization",))
            if checked.status_code == 200:
                self.redirects += 1
                expires = time.time() + self.ttl
                port = self._storage.server_address[1]
                location = (f"http://127.0.0.1:{port}/bucket/{blob.group(2)}?repo={blob.group(1)}"
                            f"&X-Amz-Expires={expires:.3f}&X-Amz-Signature={self.redirects}")
                _reply(request, 307, {"Location": location}, b"", method)
                return
        response = self._relay(request, method, request.path, ("authorization", "accept", "range"))
        relayed = _RELAYED + (("content-length",) if method == "HEAD" else ())
        _reply(request, response.status_code, {k: response.headers[k] for k in relayed if k in response.headers},
               response.content, method)

    @property
    def storage_url(self) -> str:
        return f"http://127.0.0.1:{self._storage.server_address[1]}"

    def _answer_storage(self, request: BaseHTTPRequestHandler, method: str) -> None:
        self.storage_authorizations.extend(v for k, v in request.headers.items() if k.lower() == "authorization")
        url = urlsplit(request.path)
        if url.path == "/token":  # the realm storage names: a token for whoever asks
            _reply(request, 200, {"Content-Type": "application/json"}, b'{"token": "storage-token"}', method)
            return
        if self.challenge and (self.refused is None or url.path.rsplit("/", 1)[1] in self.refused):
            self.challenged += 1
            _reply(request, 401, {"WWW-Authenticate": self.challenge.format(storage=self.storage_url)}, b"", method)
            return
        if "authorization" in (k.lower() for k in request.headers.keys()):
            self.authorization_leaks += 1
            _reply(request, 400, {}, b"<Error><Code>InvalidArgument</Code>Only one auth mechanism allowed</Error>", method)
            return
        query = parse_qs(url.query)
        if time.time() > float(query["X-Amz-Expires"][0]):
            self.expired_refusals += 1
            _reply(request, 403, {}, b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
                   method)
            return
        self.served_urls.add(request.path)
        digest = url.path.rsplit("/", 1)[1]
        headers = {k: v for k, v in request.headers.items() if k.lower() == "range"}
        auth = self.storage_auth if isinstance(self.storage_auth, tuple) else None
        if callable(self.storage_auth):
            headers["Authorization"] = self.storage_auth(query["repo"][0])
        response = httpx.request(method, f"{self.upstream}/v2/{query['repo'][0]}/blobs/{digest}", headers=headers,
                                 auth=auth, timeout=30)
        _reply(request, response.status_code, {k: response.headers[k] for k in ("content-range",)
                                               if k in response.headers}, response.content, method)
