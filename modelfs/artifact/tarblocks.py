"""``extract`` of a view of a plain tar layer: its headers and the view's members read by
ranges, each block checked against the block index the manifest names before a byte of it
is used.

A plain tar has random access, and where the manifest names a block index (README,
"Integrity": its digest vouches for every block's hash, whichever origin served them) a
view of one member has no reason to download the others (a publisher packing every GGUF
quantization in one tar layer). Without such an index ``extract`` streams the layer whole
and checks it against its digest, as before: nothing is used before it checked out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import httpx

from ..errors import CacheError, IntegrityError
from ..formats.blockindex import BlockIndex
from ..formats.spec import Descriptor
from ..registry import RegistryReader
from ..storage.entry import BlobEntry
from ..storage.store import BlockDamaged

KEEP = 2  # blocks kept after a read: the next header, or the block a member's next chunk starts in
CHUNK = 32 << 20  # a member's bytes are read this much at a time: one range request each


def expected_hashes(index: BlockIndex | None, layer: Descriptor) -> list[bytes] | None:
    """The hash of each block of ``layer``'s blob, from ``index`` (only ever one the manifest
    names), or None when it does not cover that blob whole."""
    if index is None:
        return None
    expected = index.for_blob(layer.digest, index.block_size)
    return expected if expected is not None and len(expected) == -(-layer.size // index.block_size) else None


class CheckedBlocks:
    """Byte ranges of one blob, fetched by ranged GETs, every block matched against its hash
    in the index before it is used; a block that does not match makes the client leave its
    mirrors out and is read once more (from the registry itself), then refused."""

    def __init__(self, client: RegistryReader, repository: str, layer: Descriptor, expected: list[bytes],
                 block_hash: Callable[[bytes], bytes], block_size: int) -> None:
        self.client, self.repository, self.layer = client, repository, layer
        self.expected, self.block_hash, self.block_size = expected, block_hash, block_size
        self.fetched = 0  # bytes received
        self.from_cache = 0  # bytes read back from the cache
        self.entry: BlobEntry | None = None  # the blob's cache entry, where blocks a pull stored are read back
        self._held: OrderedDict[int, bytes] = OrderedDict()

    async def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset + size) of the blob, each block they lie in checked."""
        size = min(size, self.layer.size - offset)
        if size <= 0 or offset < 0:
            return b""
        bs = self.block_size
        first, last = offset // bs, (offset + size - 1) // bs
        blocks = {i: self._held[i] for i in range(first, last + 1) if i in self._held}
        for i in range(first, last + 1):
            cached = None if i in blocks else self._cached(i)
            if cached is not None:
                blocks[i] = cached
        missing = [i for i in range(first, last + 1) if i not in blocks]
        if missing:
            blocks.update(await self._fetch(missing[0], missing[-1]))
        for i in range(max(first, last - KEEP + 1), last + 1):
            self._held[i] = blocks[i]
            self._held.move_to_end(i)
        while len(self._held) > KEEP:
            self._held.popitem(last=False)
        data = b"".join(blocks[i] for i in range(first, last + 1))
        start = offset - first * bs
        return data[start:start + size]

    def _cached(self, index: int) -> bytes | None:
        """Block ``index`` from the cache, if it is there, reads back against its stored
        checksum and matches the index (whatever flags say); else None (fetched instead)."""
        if self.entry is None or not self.entry.has(index):
            return None
        try:
            data = self.entry.read_block(index)
        except (BlockDamaged, CacheError):
            return None
        if self.block_hash(data) != self.expected[index]:
            return None
        self.from_cache += len(data)
        return data

    async def _fetch(self, first: int, last: int) -> dict[int, bytes]:
        """Blocks ``first``-``last``, each matched against the index. Whatever the first answer
        got wrong (a block's bytes, or its length: a mirror cut off mid-range) is one decision
        here: the mirrors are left out a while and the range read again, from the registry
        itself; wrong again, refused."""
        got = await self._receive(first, last, first_try=True)
        wrong = self._wrong(first, last, got)
        if wrong is not None:  # mirrors left out a while: read again, from the registry itself
            self.client.suspect(f"block {wrong[0]} of {self.layer.digest}")
            got = await self._receive(first, last, first_try=False)
            wrong = self._wrong(first, last, got)
        if wrong is not None:
            raise IntegrityError(f"block {wrong[0]} of blob {self.layer.digest} {wrong[1]}; nothing written")
        return got

    def _wrong(self, first: int, last: int, got: dict[int, bytes]) -> tuple[int, str] | None:
        """The first block of ``first``-``last`` the answer got wrong, and how: cut short
        (the body ended early), or not matching its hash; None if every one is right."""
        for i in range(first, last + 1):
            data, length = got.get(i, b""), min(self.block_size, self.layer.size - i * self.block_size)
            if len(data) != length:
                return i, f"came cut short ({len(data)} of its {length} bytes)"
            if self.block_hash(data) != self.expected[i]:
                return i, "does not match the block index the manifest names"
        return None

    async def _receive(self, first: int, last: int, first_try: bool) -> dict[int, bytes]:
        """The blocks the answer to one range request holds, whole or not (past what was
        asked is dropped: never more than asked is held). ``first_try``: a connection that
        breaks mid-body only cuts the answer short (a mirror's: read again by :meth:`_fetch`)."""
        bs = self.block_size
        start, end = first * bs, min((last + 1) * bs, self.layer.size)
        body = bytearray()
        try:
            async with self.client.stream_blob(self.repository, self.layer.digest, start, end) as response:
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > end - start:
                        break
        except httpx.TransportError:
            if not first_try:
                raise
        self.fetched += len(body)
        del body[end - start:]
        return {i: bytes(body[(i - first) * bs:(i - first + 1) * bs]) for i in range(first, last + 1)
                if (i - first) * bs < len(body)}
