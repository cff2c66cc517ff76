"""Bodies that are read whole (manifests, tokens, listings, error bodies, referrers), bounded
after decoding, not only before.

We ask for ``Accept-Encoding: identity``, but a server may gzip its answer anyway, and httpx
would inflate it without limit: 398 KB of gzip made 400 MiB, and ``inspect`` peaked at 843 MB
before anything refused it. So the body is read raw here and a ``gzip``/``deflate`` encoding
is inflated by this module, incrementally, never past ``cap`` bytes of output; any other
encoding is refused. The response handed back holds the decoded bytes and no
``Content-Encoding``, so nothing downstream decodes it again.

Blob bodies are never decoded at all: they are hashed and served as the raw bytes that came
(``aiter_raw``; ``http.client`` in the worker threads does not decode), so an encoded blob
fails its digest instead of inflating.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import cast
from urllib.parse import urlsplit

import httpx

from ..errors import ConnectionLostError, RegistryError

# Distribution caps manifests at 4 MiB; tokens, listings and error bodies are far smaller
MAX_BODY_BYTES = 8 << 20

# wbits per Content-Encoding: gzip framing, or zlib framing (HTTP's "deflate")
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class _Inflater:
    """Output of one encoded body, refused as soon as it would pass ``cap`` bytes."""

    def __init__(self, encoding: str, cap: int, host: str, what: str) -> None:
        wbits = _WBITS.get(encoding)
        self._zlib = zlib.decompressobj(wbits) if wbits is not None else None
        self.cap, self.host, self.what = cap, host, what
        self._inflated = "" if wbits is None else f" (inflated from {encoding})"
        self.out = bytearray()

    def feed(self, data: bytes) -> None:
        if self._zlib is None:
            self._append(data)
            return
        try:
            while data:
                self._append(self._zlib.decompress(data, self.cap + 1 - len(self.out)))
                data = self._zlib.unconsumed_tail
        except zlib.error as exc:
            raise RegistryError(f"{self.host} sent an answer to {self.what} that does not decode ({exc})") from None

    def finish(self) -> bytes:
        if self._zlib is not None:
            self._append(self._zlib.flush(self.cap + 1 - len(self.out)))
        return bytes(self.out)

    def _append(self, data: bytes) -> None:
        self.out += data
        if len(self.out) > self.cap:
            raise RegistryError(f"{self.host} sent over {self.cap} bytes{self._inflated} in answer to {self.what}; "
                                "refusing it")


async def read_bounded(response: httpx.Response, method: str, path: str, cap: int) -> httpx.Response:
    """The whole body of ``response``, decoded, refused past ``cap`` bytes before or after
    decoding: a hostile or broken server cannot make us hold gigabytes. Returns a response
    that holds those bytes (``.content``, ``.json()``) and says no ``Content-Encoding``."""
    host = response.url.netloc.decode()
    if response.is_stream_consumed:  # held whole already: an in-process transport's answer, never the network's
        if len(response.content) > cap:
            raise RegistryError(f"{host} sent over {cap} bytes in answer to {method} {urlsplit(path).path}; refusing it")
        return response
    encoding = response.headers.get("content-encoding", "identity").strip().lower() or "identity"
    what = f"{method} {urlsplit(path).path}"
    if encoding != "identity" and encoding not in _WBITS:
        await response.aclose()
        raise RegistryError(f"{host} sent its answer to {what} as {encoding!r}, which modelfs does not decode "
                            "(it asks for identity); refusing it")
    inflater = _Inflater(encoding, cap, host, what)
    received = 0
    try:
        raw = cast(AsyncGenerator[bytes, None], response.aiter_raw())  # a generator, typed as an iterator
        async with aclosing(raw) as chunks:  # closed at once when refused midway
            async for chunk in chunks:
                received += len(chunk)
                if received > cap:
                    raise RegistryError(f"{host} sent over {cap} bytes in answer to {what}; refusing it")
                inflater.feed(chunk)
        body = inflater.finish() if received else b""
    except httpx.TransportError as exc:
        raise ConnectionLostError(f"connection lost while reading the answer to {what} from {host}: "
                                  f"{exc or type(exc).__name__}") from None
    finally:
        await response.aclose()
    headers = [(key, value) for key, value in response.headers.multi_items() if key.lower() != "content-encoding"]
    whole = httpx.Response(response.status_code, headers=headers, content=body, request=response.request)
    whole.read()
    return whole
