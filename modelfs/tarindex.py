"""Index an uncompressed tar by reading only its headers.

A weight file packed as a tar layer is one 512-byte header (plus PAX/GNU long-name records)
followed by the data, so a member's (offset, size) inside the blob is learnt from a couple
of small range reads, and the mount serves the data with a plain offset. Every member is
checked here, so the tree never contains a path that leaves it.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import Awaitable, Callable

from .errors import ManifestError, UnsafePathError
from .paths import clean_member_path, link_target_inside

BLOCK = 512
ReadAt = Callable[[int, int], Awaitable[bytes]]

REGULAR, HARDLINK, SYMLINK, DIRECTORY = "file", "hardlink", "symlink", "dir"


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


async def index_tar(read_at: ReadAt, blob_size: int, where: str) -> list[Member]:
    """List the members of an uncompressed tar blob, refusing anything hostile."""
    members: list[Member] = []
    seen: set[str] = set()
    offset = 0
    pending: dict[str, str] = {}
    while offset + BLOCK <= blob_size:
        header = await read_at(offset, BLOCK)
        if len(header) < BLOCK:
            raise ManifestError(f"{where}: tar header at {offset} is truncated")
        if header == bytes(BLOCK):
            break
        if not _checksum_ok(header):
            raise ManifestError(f"{where}: tar header at offset {offset} has a bad checksum (not a tar?)")
        typeflag = header[156:157]
        size = _octal(header[124:136], "size", where)
        data_offset = offset + BLOCK
        if data_offset + size > blob_size:
            raise ManifestError(f"{where}: tar member at {offset} claims {size} bytes, past the end of the blob")
        next_offset = data_offset + (size + BLOCK - 1) // BLOCK * BLOCK
        if typeflag in (b"x", b"g", b"L", b"K"):
            if size > 1 << 20:
                raise ManifestError(f"{where}: tar extended header of {size} bytes refused")
            payload = await read_at(data_offset, size)
            if typeflag == b"x":
                pending.update(_pax(payload, where))
            elif typeflag == b"L":
                pending["path"] = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif typeflag == b"K":
                pending["linkpath"] = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            offset = next_offset
            continue
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if prefix:
                name = f"{prefix}/{name}"
        link = header[157:257].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        name = pending.pop("path", name)
        link = pending.pop("linkpath", link)
        if "size" in pending:
            size = int(pending.pop("size"))
            next_offset = data_offset + (size + BLOCK - 1) // BLOCK * BLOCK
            if data_offset + size > blob_size:
                raise ManifestError(f"{where}: tar member {name!r} claims {size} bytes, past the end of the blob")
        pending.clear()
        member_where = f"{where}, member {name!r}"
        mode = _octal(header[100:108], "mode", member_where) & 0o777
        mtime = _octal(header[136:148], "mtime", member_where)
        kind = {b"0": REGULAR, b"\0": REGULAR, b"7": REGULAR, b"1": HARDLINK, b"2": SYMLINK, b"5": DIRECTORY}.get(typeflag)
        if kind is None:
            raise UnsafePathError(f"{member_where}: tar entry type {typeflag!r} (device, fifo or unknown) refused")
        if kind == DIRECTORY and name.strip("/") in ("", "."):
            offset = next_offset
            continue
        path = clean_member_path(name, member_where)
        if kind in (SYMLINK, HARDLINK):
            target = link if kind == SYMLINK else clean_member_path(link, member_where)
            if kind == SYMLINK and not link_target_inside(path, link):
                raise UnsafePathError(f"{member_where}: symlink to {link!r} leaves the model tree")
            if kind == HARDLINK and target not in seen:
                raise UnsafePathError(f"{member_where}: hard link to {link!r}, which is not an earlier member")
            link = target
        if path in seen and kind != DIRECTORY:
            raise UnsafePathError(f"{member_where}: duplicate path")
        seen.add(path)
        members.append(Member(path, kind, data_offset, size if kind == REGULAR else 0, mode, mtime, link))
        offset = next_offset
    return members


def check_tarinfo(info: "tarfile.TarInfo", seen: set[str], where: str) -> tuple[str, str, str] | None:
    """Vet one member read by :mod:`tarfile`: (clean path, kind, link) or None for the root dir.

    The same rules as :func:`index_tar`, for the paths that stream through ``tarfile``
    (compressed layers, ``extract``). ``seen`` collects the paths so far.
    """
    member_where = f"{where}, member {info.name!r}"
    if info.isdir():
        if info.name.strip("/") in ("", "."):
            return None
        return clean_member_path(info.name, member_where), DIRECTORY, ""
    path = clean_member_path(info.name, member_where)
    if path in seen:
        raise UnsafePathError(f"{member_where}: duplicate path")
    if info.issym():
        if not link_target_inside(path, info.linkname):
            raise UnsafePathError(f"{member_where}: symlink to {info.linkname!r} leaves the model tree")
        kind, link = SYMLINK, info.linkname
    elif info.islnk():
        link = clean_member_path(info.linkname, member_where)
        if link not in seen:
            raise UnsafePathError(f"{member_where}: hard link to {info.linkname!r}, which is not an earlier member")
        kind = HARDLINK
    elif info.isreg():
        kind, link = REGULAR, ""
    else:
        raise UnsafePathError(f"{member_where}: tar entry type {info.type!r} (device, fifo or unknown) refused")
    seen.add(path)
    return path, kind, link
