"""The OCI distribution API over httpx on trio.

One :class:`RegistryClient` per registry host, over a :class:`~.session.RegistrySession`
(the connection pool, authentication from the registry's own challenges, redirects, retries
within one deadline per request). Blobs are streamed both ways and never held whole; every
other body is read whole, bounded after decoding (:mod:`.bounded`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urljoin

import httpx

from ..credentials import Credential, CredentialStore
from ..errors import (
    AuthenticationError,
    ConnectionLostError,
    IntegrityError,
    RegistryError,
)
from ..formats.spec import MANIFEST_ACCEPT
from ..retry import SMALL_BLOB_ATTEMPTS, RetryPolicy
from .ranges import BlobLocation
from .session import CONTROL_TIMEOUT, ContentFactory, RegistrySession, within_deadline

log = logging.getLogger(__name__)

# How long a blob location is reused before it is resolved again. A redirect target (a
# presigned storage URL) is resolved again well inside the validity real registries give it
# (Distribution's S3 driver: 20 minutes); one that expires sooner is refused by its server,
# and that refusal resolves it again too. On the registry's own origin, a refused token does.
REDIRECT_TTL = 60.0
LOCATION_TTL = 300.0
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


def _empty_body() -> bytes:
    return b""


class RegistryClient:
    def __init__(self, registry: str, credentials: CredentialStore | None = None, *, plain_http: bool = False,
                 ca_file: str | None = None, retry: RetryPolicy | None = None, timeout: float = CONTROL_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        from ..reference import DOCKER_HUB, DOCKER_HUB_API
        self.registry = registry
        self.host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
        self.base_url = f"{'http' if plain_http else 'https'}://{self.host}"
        self.ca_file = ca_file
        self._session = RegistrySession(registry, self.host, self.base_url, credentials, ca_file=ca_file,
                                        retry=retry or RetryPolicy(), timeout=timeout, transport=transport)
        self.origin = self._session.origin  # the only place our credentials go

    @property
    def retry(self) -> RetryPolicy:
        return self._session.retry

    async def __aenter__(self) -> RegistryClient:
        self._session.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._session.close()

    def use_credential(self, credential: Credential) -> None:
        """Use these credentials instead of the stored ones (``login`` checks them first)."""
        self._session.auth.use(credential)

    async def request(self, method: str, path: str, *, scope: str, headers: dict[str, str] | None = None,
                      content: ContentFactory | None = None, stream: bool = False,
                      retry: RetryPolicy | None = None) -> httpx.Response:
        """One request through the session (:meth:`.session.RegistrySession.request`)."""
        return await self._session.request(method, path, scope=scope, headers=headers, content=content,
                                           stream=stream, retry=retry)

    def _raise_for(self, response: httpx.Response, what: str) -> None:
        self._session.raise_for(response, what)

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
        with within_deadline(seconds, lambda: f"{self.host} did not send blob {digest} within {seconds:g}s (gave up)"):
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
        authorization = await self._session.auth.header(self.scope(repository))
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
