"""Index an uncompressed tar by reading only its headers.

A weight file packed as a tar layer is one 512-byte header (plus PAX/GNU long-name records)
followed by the data, so a member's (offset, size) inside the blob is learnt from a couple
of small range reads, and the mount serves the data with a plain offset. Every member is
vetted here (:func:`modelfs.formats.tree_check.vet`); the whole tree is checked by the mount's tree.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ..errors import ManifestError, UnsafePathError
from .tree_check import DIRECTORY, HARDLINK, REGULAR, SYMLINK, vet

BLOCK = 512
MAX_MEMBERS = 1_000_000  # a real layer has thousands; millions of empty members are an attack on memory
ReadAt = Callable[[int, int], Awaitable[bytes]]


@dataclass(frozen=True)
class Member:
    path: str
    kind: str
    offset: int  # of the data inside the blob
    size: int
    mode: int
    mtime: int
    link: str = ""


def _octal(field: bytes, what: str, where: str) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        value = int.from_bytes(field[1:], "big")
        return value
    text = field.split(b"\0", 1)[0].strip().decode("ascii", "replace")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise ManifestError(f"{where}: malformed tar {what} field {text!r}") from None


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156].split(b"\0", 1)[0].strip()
    try:
        expected = int(stored or b"0", 8)
    except ValueError:
        return False
    actual = sum(header[:148]) + 8 * 32 + sum(header[156:])
    return expected == actual


def _pax(data: bytes, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos:pos + 1] not in (b"\0", b""):
        space = data.find(b" ", pos)
        if space < 0:
            raise ManifestError(f"{where}: malformed PAX header")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ManifestError(f"{where}: malformed PAX record length") from None
        if length <= 0:
            raise ManifestError(f"{where}: malformed PAX record length")
        record = data[space + 1:pos + length - 1]
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


class TarSource(Protocol):
    """Where tar bytes come from: a blob read by ranges, or a decompressing stream."""

    offset: int

    async def read(self, size: int) -> bytes: ...

    async def skip_to(self, offset: int) -> None: ...


# Headers are read in aligned chunks of this size: the headers of small members that share
# one cost one read of the blob, not one each (a layer of 100,000 small files has 100,000 to
# 300,000 header reads otherwise, each a trip through the reader). Aligned, a chunk never
# reaches into a block of the blob the unchunked read would not have touched (the cache's
# 1 MiB blocks are a multiple of it).
CHUNK = 64 << 10


class RangeSource:
    """Random access: headers are read, member data is skipped without any I/O."""

    def __init__(self, read_at: ReadAt, chunk: int = CHUNK) -> None:
        self.read_at, self.offset, self.chunk = read_at, 0, chunk
        self._held, self._held_at = b"", 0  # the last chunk read, and where it starts in the blob

    async def read(self, size: int) -> bytes:
        end = self.offset + size
        if not (self._held_at <= self.offset and end <= self._held_at + len(self._held)):
            start = self.offset - self.offset % self.chunk
            self._held = await self.read_at(start, -(-end // self.chunk) * self.chunk - start)
            self._held_at = start
        at = self.offset - self._held_at
        data = self._held[at:at + size]
        self.offset += len(data)
        return data

    async def skip_to(self, offset: int) -> None:
        self.offset = offset


def _string(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


_KINDS = {b"0": REGULAR, b"\0": REGULAR, b"7": REGULAR, b"1": HARDLINK, b"2": SYMLINK, b"5": DIRECTORY}


async def iter_members(source: TarSource, where: str, blob_size: int | None = None,
                       max_members: int = MAX_MEMBERS) -> AsyncIterator[Member]:
    """Yield each member before its data; the consumer may read the data from ``source``."""
    seen: set[str] = set()
    pending: dict[str, str] = {}
    count = extended = 0  # members, and bytes of extended headers since the last member
    while True:
        header = await source.read(BLOCK)
        if not header or header == bytes(BLOCK):
            return
        if len(header) < BLOCK:
            raise ManifestError(f"{where}: tar header at {source.offset - len(header)} is truncated")
        if not _checksum_ok(header):
            raise ManifestError(f"{where}: tar header at offset {source.offset - BLOCK} has a bad checksum (not a tar?)")
        typeflag = header[156:157]
        size = _octal(header[124:136], "size", where)
        if typeflag in (b"x", b"g", b"L", b"K"):
            extended += size  # records add up until a member clears them: bound them together
            if size > 1 << 20 or extended > 1 << 20:
                raise ManifestError(f"{where}: tar extended headers of {max(size, extended)} bytes before one member refused")
            payload = await source.read(size)
            if typeflag == b"x":
                pending.update(_pax(payload, where))
            elif typeflag in (b"L", b"K"):
                pending["path" if typeflag == b"L" else "linkpath"] = _string(payload)
            await source.skip_to(source.offset - len(payload) + _padded(size))
            continue
        count, extended = count + 1, 0
        if count > max_members:
            raise ManifestError(f"{where}: over {max_members:,} tar members; refusing the layer")
        name = _string(header[0:100])
        if header[257:262] == b"ustar" and _string(header[345:500]):
            name = f"{_string(header[345:500])}/{name}"
        name = pending.pop("path", name)
        link = pending.pop("linkpath", _string(header[157:257]))
        size = _pax_size(pending.pop("size", None), size, name, where)
        if typeflag == b"S" or any(key.startswith("GNU.sparse.") for key in pending):
            name = pending.get("GNU.sparse.name", name)
            raise ManifestError(f"{where}, member {name!r}: a sparse file (tar --sparse) has no contiguous bytes to serve "
                                "from the mount; `modelfs extract` unpacks it, or pack the layer without --sparse")
        pending.clear()
        data_offset = source.offset
        if blob_size is not None and data_offset + size > blob_size:
            raise ManifestError(f"{where}: tar member {name!r} claims {size} bytes, past the end of the blob")
        kind = _KINDS.get(typeflag)
        if kind is None:
            raise UnsafePathError(f"{where}, member {name!r}: tar entry type {typeflag!r} (device, fifo or unknown) refused")
        vetted = vet(name, kind, link, seen, where)
        if vetted is not None:
            mode = _octal(header[100:108], "mode", where) & 0o777
            yield Member(vetted[0], kind, data_offset, size if kind == REGULAR else 0, mode,
                         _octal(header[136:148], "mtime", where), vetted[1])
        await source.skip_to(data_offset + _padded(size))


def _pax_size(value: str | None, header_size: int, name: str, where: str) -> int:
    """The size a PAX record gives (it overrides the header's), checked."""
    if value is None:
        return header_size
    if not (value.isascii() and value.isdigit()):
        raise ManifestError(f"{where}, member {name!r}: PAX size {value[:40]!r} is not a byte count")
    return int(value)


def _padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


async def index_tar(read_at: ReadAt, blob_size: int, where: str) -> list[Member]:
    """List the members of an uncompressed tar blob by reading headers only."""
    return [member async for member in iter_members(RangeSource(read_at), where, blob_size)]
