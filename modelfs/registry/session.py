"""One registry origin over httpx on trio: the requests of the control plane.

A :class:`RegistrySession` owns an ``httpx.AsyncClient`` (connection pool shared by all
requests), authenticates lazily from the registry's own challenges (a 401 from any other
origin is a refusal, :mod:`.origin`; :class:`~.auth.Authenticator`), follows redirects itself
(keeping ``Range``, dropping ``Authorization`` once off the registry's origin), and retries
connection errors, 5xx and 429 with capped exponential backoff (honouring ``Retry-After``),
all within one deadline per request, by its :class:`~modelfs.retry.RetryPolicy` (tightened
per request by the caller's). Every body that is not a blob is read whole, bounded after
decoding (:mod:`.bounded`). The API on top of it is :class:`~.client.RegistryClient`.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urljoin, urlsplit

import httpx
import trio

from ..credentials import CredentialStore
from ..errors import (
    AuthenticationError,
    ConnectionLostError,
    NotFoundError,
    RegistryError,
    TLSError,
    UnavailableError,
)
from ..retry import REQUEST_REDIRECTS, RetryPolicy
from .auth import Authenticator
from .bounded import MAX_BODY_BYTES, read_bounded
from .origin import Origin
from .ranges import LocationRejected

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20
# httpx's timeouts on the control plane: each connect, and each socket read or write, of a
# request (a whole request is bounded by its RetryPolicy's deadline, a cancel scope: a server
# answering a byte at a time never trips these).
CONTROL_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
_REDIRECTS = (301, 302, 303, 307, 308)


def tune_httpcore() -> None:
    """Raise httpcore's socket read size from 64 KiB to 1 MiB.

    Measured here (doc/BENCHMARKS.md): 0.26-0.51 GB/s with 64 KiB reads, 1.09 GB/s with 1 MiB,
    the speed of a bare trio socket. httpcore has no public knob, so set the class attribute.
    """
    try:
        from httpcore._async.http11 import AsyncHTTP11Connection
    except ImportError:  # pragma: no cover - a future httpcore moved it; run slower
        log.warning("httpcore internals changed; socket reads stay at the default size")
        return
    if getattr(AsyncHTTP11Connection, "READ_NUM_BYTES", READ_SIZE) < READ_SIZE:
        AsyncHTTP11Connection.READ_NUM_BYTES = READ_SIZE


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


@contextmanager
def within_deadline(seconds: float, problem: Callable[[], str]) -> Iterator[None]:
    """Run the block within ``seconds`` in all; past that it is cancelled and the caller gets
    an :class:`UnavailableError` saying ``problem()``, as for a registry that stopped answering."""
    with trio.move_on_after(seconds) as scope:
        yield
    if scope.cancelled_caught:
        raise UnavailableError(problem())


class RegistrySession:
    def __init__(self, registry: str, host: str, base_url: str, credentials: CredentialStore | None, *,
                 ca_file: str | None, retry: RetryPolicy, timeout: float,
                 transport: httpx.AsyncBaseTransport | None) -> None:
        self.registry, self.host, self.base_url = registry, host, base_url
        self.origin = Origin.of(base_url)  # the only place our credentials go
        self.retry, self.ca_file = retry, ca_file
        self.auth = Authenticator(registry, self.origin, credentials)
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT), pool=None)
        self._transport = transport
        self.http: httpx.AsyncClient | None = None

    def open(self) -> None:
        tune_httpcore()
        verify: ssl.SSLContext | bool = True
        if self.ca_file:
            try:
                verify = ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise TLSError(f"cannot load CA file {self.ca_file}: {exc}") from None
        self.http = httpx.AsyncClient(
            verify=verify, timeout=self._timeout, follow_redirects=False, transport=self._transport,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32), trust_env=True,
            # identity: blob bytes are hashed and served at their offsets exactly as stored
            headers={"User-Agent": "modelfs/0.1", "Accept-Encoding": "identity"})

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None

    async def _send_once(self, method: str, url: str, headers: dict[str, str], content: ContentFactory | None) -> httpx.Response:
        """Send one request, following redirects; ``Authorization`` never leaves our origin."""
        assert self.http is not None
        headers = self.origin.restrict(url, headers)
        for _ in range(REQUEST_REDIRECTS):
            body = content() if content is not None else None
            request = self.http.build_request(method, url, headers=headers, content=body)
            response = await self.http.send(request, stream=True)
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
        if self.http is None:
            raise RuntimeError("RegistryClient used outside 'async with'")
        url = path if path.startswith(("http://", "https://")) else self.base_url + path
        retry = self.retry.within(retry)
        if content is not None:
            return await self._attempts(method, url, path, scope, headers, content, stream, retry)
        with within_deadline(retry.deadline, lambda: f"{self.host} did not answer {method} {urlsplit(path).path} within "
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
            auth = self.origin.allow(url, await self.auth.header(scope))
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
                    assert self.http is not None
                    await self.auth.answer(response, scope, self.http)
                    authenticated = True
                    attempt -= 1
                    continue
                try:
                    if response.status_code == 400 and url.startswith("http://"):
                        answer = await self.read_bounded(response, method, path)
                        if b"HTTP request to an HTTPS server" in answer.content:
                            raise TLSError(f"{self.host} speaks HTTPS (TLS), not plain HTTP: drop --plain-http "
                                           "(and plain_http for it in the config)")
                        return answer
                    if response.status_code != 429 and response.status_code < 500:
                        if stream and response.status_code < 300:
                            return response
                        return await self.read_bounded(response, method, path)
                    response = await self.read_bounded(response, method, path)
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
    async def read_bounded(response: httpx.Response, method: str, path: str) -> httpx.Response:
        """The whole body of a response that is not a blob (manifest, token, listing, error),
        refused past MAX_BODY_BYTES, after decoding too (:func:`.bounded.read_bounded`)."""
        return await read_bounded(response, method, path, MAX_BODY_BYTES)

    def raise_for(self, response: httpx.Response, what: str) -> None:
        """The error an answer that is not what ``what`` needed means, as a user reads it."""
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
