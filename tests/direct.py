"""Reading a mounted file with O_DIRECT: every byte comes from the daemon, none from the
kernel's page cache (which would hide a wrong byte served earlier, or retry a page whose
read failed and so hide an EIO, or turn one failure into two)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

_CHUNK = 1 << 20


def read_direct(path: Path | str, offset: int = 0, size: int | None = None) -> bytes:
    """Bytes [offset, offset + size) of ``path`` (to its end without ``size``), read with
    O_DIRECT into page-aligned buffers."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        end = os.fstat(fd).st_size if size is None else offset + size
        out = bytearray()
        with mmap.mmap(-1, _CHUNK) as buffer:
            while offset + len(out) < end:
                got = os.preadv(fd, [buffer], offset + len(out))
                if got <= 0:
                    break
                out += buffer[:min(got, end - offset - len(out))]
        return bytes(out)
    finally:
        os.close(fd)


def read_direct_or_errno(path: Path | str) -> bytes | int:
    """The whole file read with O_DIRECT, or the errno the read failed with."""
    try:
        return read_direct(path)
    except OSError as exc:
        return exc.errno or -1
