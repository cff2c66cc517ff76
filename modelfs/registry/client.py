"""The OCI distribution API over httpx on trio.

One :class:`RegistryClient` per registry host. It owns an ``httpx.AsyncClient`` (connection
pool shared by all requests), authenticates lazily from the registry's own challenges (a 401
from any other origin is a refusal, :mod:`.origin`), follows redirects itself (keeping
``Range``, dropping ``Authorization`` once off the registry's origin), and retries connection
errors, 5xx and 429 with capped exponential backoff (honouring ``Retry-After``), all within one
deadline per request. Blobs are streamed both ways and never held whole; every other body is
read whole, bounded after decoding (:mod:`.bounded`).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from urllib.parse import urljoin, urlsplit

import httpx
import trio

from ..credentials import Credential, CredentialStore
from ..errors import (
    AuthenticationError,
    ConnectionLostError,
    IntegrityError,
    NotFoundError,
    RegistryError,
    TLSError,
    UnavailableError,
)
from ..retry import REQUEST_REDIRECTS, SMALL_BLOB_ATTEMPTS, RetryPolicy
from ..spec import MANIFEST_ACCEPT
from .auth import TokenCache, parse_challenge
from .bounded import read_bounded
from .origin import Origin
from .ranges import BlobLocation, LocationRejected

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
# How long a blob location is reused before it is resolved again. A redirect target (a
# presigned storage URL) is resolved again well inside the validity real registries give it
# (Distribution's S3 driver: 20 minutes); one that expires sooner is refused by its server,
# and that refusal resolves it again too. On the registry's own origin, a refused token does.
REDIRECT_TTL = 60.0
LOCATION_TTL = 300.0
# httpx's timeouts on the control plane: each connect, and each socket read or write, of a
# request (a whole request is bounded by its RetryPolicy's deadline, a cancel scope: a server
# answering a byte at a time never trips these).
CONTROL_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
_REDIRECTS = (301, 302, 303, 307, 308)


def tune_httpcore() -> None:
    """Raise httpcore's socket read size from 64 KiB to 1 MiB.

    Measured here (DESIGN.md): 0.26-0.51 GB/s with 64 KiB reads, 1.09 GB/s with 1 MiB,
    the speed of a bare trio socket. httpcore has no public knob, so set the class attribute.
    """
    try:
        from httpcore._async.http11 import AsyncHTTP11Connection
    except ImportError:  # pragma: no cover - a future httpcore moved it; run slower
        log.warning("httpcore internals changed; socket reads stay at the default size")
        return
    if getattr(AsyncHTTP11Connection, "READ_NUM_BYTES", READ_SIZE) < READ_SIZE:
        AsyncHTTP11Connection.READ_NUM_BYTES = READ_SIZE


class BlobBody:
    """The bytes of a blob that were asked for, whatever the server did with ``Range``.

    Some servers answer a ranged GET with 200 and the whole blob — Distribution as a
    pull-through cache does while it is still fetching the blob from upstream. Such a body
    is read past the bytes before the range and cut at its end, so callers always get
    exactly their range (or less, if the connection drops, which they detect).
    """

    def __init__(self, response: httpx.Response, skip: int = 0, limit: int | None = None, what: str = "blob") -> None:
        self._response, self._skip, self._limit, self._what = response, skip, limit, what

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body's bytes; a connection lost mid-body is an :class:`UnavailableError` that
        names the blob (every caller retries or reports it; none gets an httpx internal)."""
        try:
            async for chunk in self._chunks():
                yield chunk
        except httpx.TransportError as exc:
            raise ConnectionLostError(f"connection lost while reading {self._what}: {exc or type(exc).__name__}") from None

    async def _chunks(self) -> AsyncIterator[bytes]:
        skip, left = self._skip, self._limit
        async for chunk in self._response.aiter_raw():
            if skip:
                if len(chunk) <= skip:
                    skip -= len(chunk)
                    continue
                chunk, skip = chunk[skip:], 0
            if left is not None:
                if len(chunk) >= left:
                    if left:
                        yield chunk[:left]
                    return
                left -= len(chunk)
            yield chunk


# Distribution caps manifests at 4 MiB; tokens, listings and error bodies are far smaller
MAX_BODY_BYTES = 8 << 20


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything behind it: causes, contexts, members of exception groups."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                todo.append(linked)


def _transport_problem(exc: httpx.TransportError, host: str) -> tuple[str, bool]:
    """What a transport error means for the user, in one line, and whether retrying can
    help (False: a typo or a wrong flag, said at once)."""
    for cause in _causes(exc):
        text = str(cause)
        if isinstance(cause, ssl.SSLError) and ("WRONG_VERSION_NUMBER" in text or "record layer failure" in text):
            raise TLSError(f"{host} speaks plain HTTP, not HTTPS: add --plain-http (or plain_http = true for it "
                           "in the config)")
        if isinstance(cause, ConnectionRefusedError):
            return f"cannot reach {host}: connection refused (is the registry running, on that port?)", False
        if isinstance(cause, socket.gaierror):
            return f"cannot reach {host}: unknown host ({cause.strerror or cause})", False
    reason = next((str(c) for c in _causes(exc) if str(c)), type(exc).__name__)
    return f"cannot reach {host}: {reason}", True


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _error_message(response: httpx.Response) -> str:
    try:
        errors = response.json().get("errors") or []
        if errors:
            first = errors[0]
            return f"{first.get('code', '')}: {first.get('message', '')}".strip(": ")
    except (ValueError, AttributeError, httpx.ResponseNotRead):
        pass
    return response.reason_phrase or f"HTTP {response.status_code}"


def _is_tls_failure(exc: Exception) -> bool:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


ContentFactory = Callable[[], AsyncIterator[bytes] | bytes]


def _empty_body() -> bytes:
    return b""


@contextmanager
def _deadline(seconds: float, problem: Callable[[], str]) -> Iterator[None]:
    """Run the block within ``seconds`` in all; past that it is cancelled and the caller gets
    an :class:`UnavailableError` saying ``problem()``, as for a registry that stopped answering."""
    with trio.move_on_after(seconds) as scope:
        yield
    if scope.cancelled_caught:
        raise UnavailableError(problem())


class RegistryClient:
    def __init__(self, registry: str, credentials: CredentialStore | None = None, *, plain_http: bool = False,
                 ca_file: str | None = None, retry: RetryPolicy | None = None, timeout: float = CONTROL_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        from ..reference import DOCKER_HUB, DOCKER_HUB_API
        self.registry = registry
        self.host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
        self.base_url = f"{'http' if plain_http else 'https'}://{self.host}"
        self.origin = Origin.of(self.base_url)  # the only place our credentials go
        self.retry = retry or RetryPolicy()
        self._credentials = credentials
        self._credential: Credential | None = None
        self._credential_loaded = False
        self._credential_lock = trio.Lock()
        self._tokens = TokenCache()
        self._basic = False
        self.ca_file = ca_file
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT), pool=None)
        self._transport = transport
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> RegistryClient:
        tune_httpcore()
        verify: ssl.SSLContext | bool = True
        if self.ca_file:
            try:
                verify = ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise TLSError(f"cannot load CA file {self.ca_file}: {exc}") from None
        self._http = httpx.AsyncClient(
            verify=verify, timeout=self._timeout, follow_redirects=False, transport=self._transport,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32), trust_env=True,
            # identity: blob bytes are hashed and served at their offsets exactly as stored
            headers={"User-Agent": "modelfs/0.1", "Accept-Encoding": "identity"})
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- authentication -------------------------------------------------------------------

    async def _credential_for_host(self) -> Credential | None:
        async with self._credential_lock:  # concurrent uploads must not see a half-done lookup
            if not self._credential_loaded:
                if self._credentials is not None:
                    self._credential = await self._credentials.lookup(self.registry)
                self._credential_loaded = True
        return self._credential

    def use_credential(self, credential: Credential) -> None:
        """Use these credentials instead of the stored ones (``login`` checks them first)."""
        self._credential, self._credential_loaded = credential, True

    async def _auth_header(self, scope: str) -> str | None:
        token = self._tokens.get(scope)
        if token:
            return f"Bearer {token}"
        if self._basic:
            credential = await self._credential_for_host()
            return credential.basic if credential else None
        return None

    async def _authenticate(self, response: httpx.Response, scope: str) -> None:
        """Answer a 401 of the registry's own origin (the caller checked: a 401 from anywhere
        else is a refusal, never a challenge; see :mod:`.origin`)."""
        assert self.origin.owns(response.url), "only the registry's own origin may ask for credentials"
        challenge = parse_challenge(response.headers.get("www-authenticate", ""))
        credential = await self._credential_for_host()
        if challenge is None:
            raise AuthenticationError(f"{self.registry} refused the request (401) without saying how to authenticate")
        if challenge.scheme == "basic":
            if credential is None:
                raise AuthenticationError(f"{self.registry} requires authentication: run `modelfs login {self.registry}`")
            self._basic = True
            return
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            raise AuthenticationError(f"{self.registry} asks for unsupported authentication {challenge.scheme!r}")
        await self._fetch_token(challenge.params, scope, credential)

    async def _fetch_token(self, params: dict[str, str], scope: str, credential: Credential | None) -> None:
        assert self._http is not None
        query: list[tuple[str, str | int | float | bool | None]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        query.extend(("scope", s) for s in scope.split(" ") if s)
        # the realm may be another host (Docker Hub's token service is): the registry's own
        # origin named it in its 401, so it is where the registry sends us to log in; but a
        # registry reached over TLS never gets the password sent in clear by naming http://
        realm = httpx.URL(params["realm"])
        if credential is not None and self.origin.scheme == "https" and realm.scheme != "https":
            raise AuthenticationError(f"{self.registry} names a token service without TLS ({realm.scheme}://{realm.host}); "
                                      "refusing to send the credentials there in clear")
        headers = {"Authorization": credential.basic} if credential else {}
        try:
            request = self._http.build_request("GET", params["realm"], params=query, headers=headers)
            response = await read_bounded(await self._http.send(request, stream=True), "GET", params["realm"],
                                          MAX_BODY_BYTES)
        except httpx.TransportError as exc:
            raise UnavailableError(f"cannot reach the token service of {self.registry}: {exc}") from None
        if response.status_code in (401, 403):
            if credential is None:
                raise AuthenticationError(f"{self.registry} requires authentication: run `modelfs login {self.registry}`")
            raise AuthenticationError(
                f"{self.registry} rejected the credentials of {credential.username!r} (wrong password? run `modelfs login {self.registry}`)")
        if response.status_code != 200:
            raise AuthenticationError(f"token service of {self.registry} answered HTTP {response.status_code}")
        try:
            doc = response.json()
            token = doc.get("token") or doc.get("access_token")
        except ValueError:
            token = None
        if not token:
            raise AuthenticationError(f"token service of {self.registry} returned no token")
        self._tokens.put(scope, token, doc.get("expires_in"))

    # -- the request loop -----------------------------------------------------------------

    async def _send_once(self, method: str, url: str, headers: dict[str, str], content: ContentFactory | None) -> httpx.Response:
        """Send one request, following redirects; ``Authorization`` never leaves our origin."""
        assert self._http is not None
        headers = self.origin.restrict(url, headers)
        for _ in range(REQUEST_REDIRECTS):
            body = content() if content is not None else None
            request = self._http.build_request(method, url, headers=headers, content=body)
            response = await self._http.send(request, stream=True)
            if response.status_code not in _REDIRECTS or "location" not in response.headers:
                return response
            await response.aclose()
            url = urljoin(url, response.headers["location"])
            headers = self.origin.restrict(url, headers)  # another host, port or scheme: dropped for good
            if response.status_code == 303:
                method, content = "GET", None
        raise RegistryError(f"{self.registry}: too many redirects for {method} {url}")

    async def request(self, method: str, path: str, *, scope: str, headers: dict[str, str] | None = None,
                      content: ContentFactory | None = None, stream: bool = False,
                      retry: RetryPolicy | None = None) -> httpx.Response:
        """Send with auth, redirects and retries, all within the policy's deadline: the
        client's own, tightened by ``retry`` where the caller passes one
        (:meth:`~modelfs.retry.RetryPolicy.within`). With ``stream``, a 2xx answer comes back
        unread (the caller reads and closes it); any other is read whole (bounded) like every
        answer without ``stream``.

        An upload (``content``) has no overall deadline: its time grows with its size, and
        httpx's timeouts bound each step of it."""
        if self._http is None:
            raise RuntimeError("RegistryClient used outside 'async with'")
        url = path if path.startswith(("http://", "https://")) else self.base_url + path
        retry = self.retry.within(retry)
        if content is not None:
            return await self._attempts(method, url, path, scope, headers, content, stream, retry)
        with _deadline(retry.deadline, lambda: f"{self.host} did not answer {method} {urlsplit(path).path} within "
                                               f"{retry.deadline:g}s (gave up)"):
            return await self._attempts(method, url, path, scope, headers, content, stream, retry)
        raise AssertionError("unreachable")

    async def _attempts(self, method: str, url: str, path: str, scope: str, headers: dict[str, str] | None,
                        content: ContentFactory | None, stream: bool, retry: RetryPolicy) -> httpx.Response:
        deadline = trio.current_time() + retry.deadline
        attempt, authenticated = 0, False
        while True:
            attempt += 1
            send_headers = dict(headers or {})
            auth = self.origin.allow(url, await self._auth_header(scope))
            if auth:
                send_headers["Authorization"] = auth
            retry_after = None
            try:
                response = await self._send_once(method, url, send_headers, content)
            except httpx.TransportError as exc:
                if _is_tls_failure(exc):
                    raise TLSError(f"TLS certificate of {self.host} is not trusted ({exc}); pass --ca-file, "
                                   "or --plain-http if the registry speaks plain HTTP") from None
                problem, worth_retrying = _transport_problem(exc, self.host)
                if not worth_retrying and retry.fail_fast:
                    raise UnavailableError(problem) from None
            else:
                if response.status_code == 401 and not authenticated and self.origin.owns(response.url):
                    await response.aclose()
                    self._tokens.drop(scope)
                    await self._authenticate(response, scope)
                    authenticated = True
                    attempt -= 1
                    continue
                try:
                    if response.status_code == 400 and url.startswith("http://"):
                        answer = await self._read_bounded(response, method, path)
                        if b"HTTP request to an HTTPS server" in answer.content:
                            raise TLSError(f"{self.host} speaks HTTPS (TLS), not plain HTTP: drop --plain-http "
                                           "(and plain_http for it in the config)")
                        return answer
                    if response.status_code != 429 and response.status_code < 500:
                        if stream and response.status_code < 300:
                            return response
                        return await self._read_bounded(response, method, path)
                    response = await self._read_bounded(response, method, path)
                    problem = f"{self.host} answered {response.status_code} {_error_message(response)} to {method} {path}"
                    retry_after = _retry_after(response)
                    await response.aclose()
                except ConnectionLostError as exc:
                    problem = str(exc)
            delay = retry.delay(attempt, retry_after)
            if attempt >= retry.attempts or trio.current_time() + delay > deadline:
                raise UnavailableError(f"{problem} (gave up after {attempt} attempts)")
            log.info("retrying in %.2fs: %s", delay, problem)
            await trio.sleep(delay)

    @staticmethod
    async def _read_bounded(response: httpx.Response, method: str, path: str) -> httpx.Response:
        """The whole body of a response that is not a blob (manifest, token, listing, error),
        refused past MAX_BODY_BYTES, after decoding too (:func:`.bounded.read_bounded`)."""
        return await read_bounded(response, method, path, MAX_BODY_BYTES)

    def _raise_for(self, response: httpx.Response, what: str) -> None:
        code = response.status_code
        if code in (401, 403) and not self.origin.owns(response.url):
            # storage or a CDN a redirect led to: that location refuses (an expired presigned
            # URL, or one that asks for credentials it must never get from us)
            raise LocationRejected(f"{response.url.netloc.decode()}, where {self.registry} sent the request for {what}, "
                                   f"refused it (HTTP {code})")
        if code == 401:
            raise AuthenticationError(f"authentication to {self.registry} failed for {what}: run `modelfs login {self.registry}`")
        if code == 403:
            raise AuthenticationError(f"{self.registry} denied access to {what}")
        if code == 404:
            raise NotFoundError(f"{what} not found on {self.registry} ({_error_message(response)})")
        raise RegistryError(f"{self.registry} answered {code} for {what}: {_error_message(response)}")

    # -- API ------------------------------------------------------------------------------

    @staticmethod
    def scope(repository: str, push: bool = False) -> str:
        return f"repository:{repository}:{'pull,push' if push else 'pull'}"

    async def ping(self) -> None:
        response = await self.request("GET", "/v2/", scope="")
        if response.status_code != 200:
            self._raise_for(response, "the API root /v2/")

    async def check_login(self, repository: str | None = None) -> None:
        """Prove the credentials work: /v2/ with basic auth, or a token for a pull scope."""
        scope = self.scope(repository) if repository else "registry:catalog:*"
        response = await self.request("GET", "/v2/", scope=scope)
        if response.status_code == 401 and self.origin.owns(response.url):
            raise AuthenticationError(f"{self.registry} rejected the credentials")
        if response.status_code != 200:
            self._raise_for(response, "the API root /v2/")

    async def get_manifest(self, repository: str, target: str, retry: RetryPolicy | None = None
                           ) -> tuple[bytes, str, str]:
        """Fetch a manifest; returns (bytes, media type, digest), the digest checked."""
        response = await self.request("GET", f"/v2/{repository}/manifests/{target}", scope=self.scope(repository),
                                      headers={"Accept": MANIFEST_ACCEPT}, retry=retry)
        if response.status_code != 200:
            self._raise_for(response, f"manifest {repository}:{target}" if not target.startswith("sha256:") else f"manifest {repository}@{target}")
        data = response.content
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if target.startswith("sha256:") and digest != target:
            raise IntegrityError(f"manifest {repository}@{target} from {self.registry} has digest {digest}")
        claimed = response.headers.get("docker-content-digest")
        if claimed and claimed.startswith("sha256:") and claimed != digest:
            raise IntegrityError(f"manifest {repository}:{target}: registry claims {claimed}, bytes hash to {digest}")
        return data, response.headers.get("content-type", "").split(";")[0], digest

    async def get_blob(self, repository: str, digest: str, max_size: int = 4 << 20,
                       retry: RetryPolicy | None = None) -> bytes:
        """Fetch a small blob whole (config, index) and verify its digest; bytes that do not
        match (corrupted on the way) are fetched again, twice at most. All of it within the
        policy's deadline: its body is read whole, and a trickle must not hold the caller."""
        seconds = self.retry.within(retry).deadline
        with _deadline(seconds, lambda: f"{self.host} did not send blob {digest} within {seconds:g}s (gave up)"):
            for attempt in range(1, SMALL_BLOB_ATTEMPTS + 1):
                try:
                    return await self._get_blob_once(repository, digest, max_size, retry)
                except (IntegrityError, ConnectionLostError) as exc:
                    if attempt == SMALL_BLOB_ATTEMPTS:
                        raise
                    log.warning("%s; fetching it again", exc)
        raise AssertionError("unreachable")

    async def _get_blob_once(self, repository: str, digest: str, max_size: int, retry: RetryPolicy | None) -> bytes:
        chunks, total = [], 0
        async with self.stream_blob(repository, digest, retry=retry) as response:
            async for chunk in response.aiter_raw():
                total += len(chunk)
                if total > max_size:
                    raise RegistryError(f"blob {digest} is larger than {max_size} bytes; refusing to load it whole")
                chunks.append(chunk)
        data = b"".join(chunks)
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(f"blob {digest} from {self.registry} does not match its digest")
        return data

    @asynccontextmanager
    async def stream_blob(self, repository: str, digest: str, start: int | None = None,
                          end: int | None = None, retry: RetryPolicy | None = None) -> AsyncIterator[BlobBody]:
        """Open a blob (or bytes [start, end)) for streaming; checks the Content-Range."""
        headers = {}
        ranged = start is not None
        if ranged:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        response = await self.request("GET", f"/v2/{repository}/blobs/{digest}", scope=self.scope(repository),
                                      headers=headers, stream=True, retry=retry)
        try:
            if response.status_code == 416:
                raise RegistryError(f"{self.registry}: range {start}-{end} is outside blob {digest}")
            if response.status_code not in (200, 206):
                self._raise_for(response, f"blob {digest} in {repository}")  # read whole by request()
            if ranged and response.status_code == 206:
                expected = f"bytes {start}-"
                if not response.headers.get("content-range", "").startswith(expected):
                    raise RegistryError(f"{self.registry} answered range {response.headers.get('content-range')!r}, asked {start}-{end}")
                yield BlobBody(response, what=f"{digest} from {self.host}")
            elif ranged:
                if start:
                    log.info("%s ignored Range for %s (whole blob sent); reading past %d bytes", self.host, digest, start)
                yield BlobBody(response, skip=start or 0, limit=None if end is None else end - (start or 0),
                               what=f"{digest} from {self.host}")
            else:
                yield BlobBody(response, what=f"{digest} from {self.host}")
        finally:
            await response.aclose()

    async def blob_location(self, repository: str, digest: str) -> BlobLocation:
        """Where worker threads first try to read ranges of a blob (:mod:`.ranges`), with no
        request: our own URL and the credentials we already hold for the repository. A worker
        that is redirected follows (``Authorization`` stays with this origin); one that is
        refused comes back for :meth:`locate_blob`."""
        path = f"/v2/{repository}/blobs/{digest}"
        authorization = await self._auth_header(self.scope(repository))
        return BlobLocation(self.base_url + path, authorization, self.host, time.monotonic() + LOCATION_TTL,
                            owner=self.origin)

    def moved_location(self, location: BlobLocation, url: str) -> BlobLocation:
        """The location a redirect of ``location`` points to: ``Authorization`` only while the
        chain stays on the origin it belongs to (scheme, host and port: an https -> http
        downgrade drops it), and gone for good once it left."""
        return BlobLocation(url, location.owner.allow(url, location.authorization), location.source,
                            time.monotonic() + REDIRECT_TTL, redirected=True, owner=location.owner)

    async def locate_blob(self, repository: str, digest: str, retry: RetryPolicy | None = None) -> BlobLocation:
        """Where worker threads read ranges of a blob, asked of the registry: the URL a GET
        ends at after redirects, with ``Authorization`` only if that URL is on our own origin.
        One ranged GET of a single byte, through auth, redirects and retries like any request
        (after a worker was refused: an expired token, a mirror without the blob)."""
        path = f"/v2/{repository}/blobs/{digest}"
        response = await self.request("GET", path, scope=self.scope(repository), headers={"Range": "bytes=0-0"},
                                      stream=True, retry=retry)
        try:
            if response.status_code not in (200, 206):
                self._raise_for(response, f"blob {digest} in {repository}")  # read whole by request()
            url = str(response.url)
            authorization = self.origin.allow(url, response.request.headers.get("authorization"))
        finally:
            await response.aclose()
        redirected = url != self.base_url + path
        ttl = REDIRECT_TTL if redirected else LOCATION_TTL
        return BlobLocation(url, authorization, self.host, time.monotonic() + ttl, redirected, owner=self.origin)

    def location_failed(self, location: BlobLocation, exc: Exception) -> None:
        """A range read from ``location`` failed: nothing to do here (there is no other source
        to turn to; the fetch that read it retries, and asks where to read afresh)."""

    def suspect(self, what: str) -> None:
        """Bytes read through this client did not match their digest: nothing to route
        around (they came from the registry itself; the fetch reads them again)."""

    def without_mirrors(self) -> RegistryClient:
        return self

    async def blob_size(self, repository: str, digest: str, retry: RetryPolicy | None = None) -> int | None:
        """HEAD a blob: its size, or None when the registry does not have it."""
        response = await self.request("HEAD", f"/v2/{repository}/blobs/{digest}", scope=self.scope(repository),
                                      retry=retry)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            self._raise_for(response, f"blob {digest}")
        return int(response.headers.get("content-length", "-1"))

    async def mount_blob(self, repository: str, digest: str, source: str) -> bool:
        """Cross-repository mount: link a blob the registry already holds in ``source``."""
        scope = f"{self.scope(repository, push=True)} {self.scope(source)}"
        response = await self.request("POST", f"/v2/{repository}/blobs/uploads/?mount={digest}&from={source}", scope=scope)
        if response.status_code == 201:
            return True
        if response.status_code == 202 and "location" in response.headers:  # mount refused, upload opened
            await self.request("DELETE", urljoin(str(response.url), response.headers["location"]), scope=scope)
        return False

    async def upload_blob(self, repository: str, digest: str, size: int, open_chunks: ContentFactory,
                          chunked: bool = False) -> None:
        """Upload a blob monolithically (one streamed PUT) or, if ``chunked``, as PATCHes.

        ``open_chunks`` is called again on every attempt, so a retried upload re-reads its
        source instead of buffering it.
        """
        scope = self.scope(repository, push=True)
        response = await self.request("POST", f"/v2/{repository}/blobs/uploads/", scope=scope)
        if response.status_code != 202 or "location" not in response.headers:
            self._raise_for(response, f"upload of {digest} to {repository}")
        location = urljoin(str(response.url), response.headers["location"])
        if chunked:
            offset = 0
            async for piece in open_chunks():  # type: ignore[union-attr]
                data = bytes(piece)

                def chunk(data: bytes = data) -> bytes:
                    return data

                response = await self.request(
                    "PATCH", location, scope=scope, content=chunk,
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data)),
                             "Content-Range": f"{offset}-{offset + len(data) - 1}"})
                if response.status_code != 202:
                    self._raise_for(response, f"chunk at {offset} of {digest}")
                location = urljoin(str(response.url), response.headers["location"])
                offset += len(data)
            body: ContentFactory | None = _empty_body
            length = 0
        else:
            body, length = open_chunks, size
        sep = "&" if "?" in location else "?"
        response = await self.request("PUT", f"{location}{sep}digest={digest}", scope=scope, content=body,
                                      headers={"Content-Type": "application/octet-stream", "Content-Length": str(length)})
        if response.status_code != 201:
            self._raise_for(response, f"upload of {digest}")

    async def referrers(self, repository: str, digest: str, retry: RetryPolicy | None = None) -> bytes | None:
        """The referrers API listing for ``digest``, or None where the registry lacks the API."""
        response = await self.request("GET", f"/v2/{repository}/referrers/{digest}", scope=self.scope(repository),
                                      headers={"Accept": "application/vnd.oci.image.index.v1+json"}, retry=retry)
        if response.status_code == 200 and "json" in response.headers.get("content-type", ""):
            return response.content
        if response.status_code in (404, 405, 400):
            return None
        self._raise_for(response, f"referrers of {digest}")
        return None

    async def put_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> None:
        response = await self.request("PUT", f"/v2/{repository}/manifests/{reference}", scope=self.scope(repository, push=True),
                                      content=lambda: data, headers={"Content-Type": media_type})
        if response.status_code not in (200, 201):
            self._raise_for(response, f"manifest {repository}:{reference}")
