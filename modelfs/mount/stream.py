"""A compressed tar layer's body (tar+gzip, tar+zstd) as a sequential tar source: hashed
(the layer digest) and decompressed on the fly, a bounded window at a time, and a guard over
a body that stalls. The pass that fills a layer's files from it is :mod:`.layerstream`.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import AsyncIterator, Callable

import trio

from ..errors import DamagedStreamError
from ..formats.spec import Packing
from ..formats.zstd import ZstdDecompressor, ZstdError

_WINDOW = 4 << 20  # decompress at most this much per step (a gzip bomb cannot balloon memory)


class _Decompressor:
    """gzip or zstd, incremental, at most _WINDOW bytes out per step (a few KiB of hostile
    input cannot balloon memory). Concatenated gzip members and zstd frames form one stream
    (pigz, pzstd and Go's writers may produce several; Go's readers, like modctl's and
    containerd's, read across them): a finished member with bytes after it starts the next."""

    def __init__(self, packing: Packing) -> None:
        self._gzip = packing is Packing.TAR_GZIP
        self._obj = self._new()
        self._next = b""  # input past the end of the member or frame just finished

    def _new(self):
        return zlib.decompressobj(wbits=47) if self._gzip else ZstdDecompressor()

    def feed(self, data: bytes) -> bytes:
        if self._obj.eof:
            self._obj = self._new()
        out = self._obj.decompress(data, _WINDOW)
        if self._obj.eof:
            self._next = self._obj.unused_data
        return out

    def step(self) -> bytes | None:
        """More output from input already given, or None when more input is needed."""
        if self._next:
            data, self._next = self._next, b""
            return self.feed(data)
        if self._obj.eof:
            return None
        if self._gzip:  # input held back by the window, or output zlib still holds
            out = self.feed(self._obj.unconsumed_tail)
        elif not self._obj.needs_input:
            out = self.feed(b"")
        else:
            return None
        return out or None

    @property
    def finished(self) -> bool:
        """The input ended at the end of a member or frame, not inside one."""
        return self._obj.eof and not self._next


class StallGuard:
    """A cancel scope for one response that fires when less than ``quantum`` bytes arrived
    in ``seconds``: a server that trickles (a few KB/s never trips a read timeout) cannot hold
    a fetch slot for hours."""

    def __init__(self, seconds: float, quantum: int = 1 << 20) -> None:
        self.seconds, self.quantum = seconds, quantum
        self.scope = trio.CancelScope(deadline=trio.current_time() + seconds)
        self._fed = 0

    def fed(self, size: int) -> None:
        self._fed += size
        if self._fed >= self.quantum:
            self._fed = 0
            self.scope.deadline = trio.current_time() + self.seconds

    @property
    def fired(self) -> bool:
        return self.scope.cancelled_caught


class StreamSource:
    """A sequential tar source over a compressed HTTP body (see ``tarindex.TarSource``)."""

    def __init__(self, chunks: AsyncIterator[bytes], packing: Packing, where: str) -> None:
        self._chunks = chunks
        self._where = where
        self._decompressor = _Decompressor(packing)
        self._buffer = bytearray()
        self._eof = False
        self._input_done = False
        self.offset = 0
        self.hasher = hashlib.sha256()
        self.compressed_bytes = 0
        self.on_progress: Callable[[int], None] | None = None  # told how many compressed bytes arrived

    async def _fill(self, size: int) -> None:
        while len(self._buffer) < size and not self._eof:
            out = self._step()
            if out is not None:
                self._buffer += out
                continue
            if self._input_done:
                self._eof = True
                if not self._decompressor.finished:
                    raise DamagedStreamError(f"{self._where}: compressed stream ends early, at byte {self.compressed_bytes} "
                                        "(truncated blob?)")
                return
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self._input_done = True
                continue
            self.hasher.update(chunk)
            self.compressed_bytes += len(chunk)
            if self.on_progress is not None:
                self.on_progress(len(chunk))
            self._buffer += self._feed(chunk)

    def _step(self) -> bytes | None:
        try:
            return self._decompressor.step()
        except (zlib.error, ZstdError) as exc:
            raise DamagedStreamError(f"{self._where}: corrupt compressed stream at byte {self.compressed_bytes}: {exc}") from None

    def _feed(self, data: bytes) -> bytes:
        try:
            return self._decompressor.feed(data)
        except (zlib.error, ZstdError) as exc:
            raise DamagedStreamError(f"{self._where}: corrupt compressed stream at byte {self.compressed_bytes}: {exc}") from None

    async def read(self, size: int) -> bytes:
        await self._fill(size)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        self.offset += len(data)
        return data

    async def skip_to(self, offset: int) -> None:
        while self.offset < offset:
            if not await self.read(min(offset - self.offset, _WINDOW)):
                return

    async def drain(self) -> None:
        """Consume the rest so the whole blob is hashed."""
        while not self._eof:
            self._buffer.clear()
            await self._fill(_WINDOW)
        self._buffer.clear()
