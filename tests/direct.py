"""Reads that the kernel cannot retry behind our back: O_DIRECT, into page-aligned buffers.

A buffered read whose page failed is retried by the kernel at once, which can hide an EIO
(the retry may succeed) or turn one failure into two; tests that must see what one read of
the mount answered use these.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

CHUNK = 1 << 20


def read_direct(path: Path | str) -> bytes | int:
    """The whole file read with O_DIRECT, or the errno the read failed with."""
    buffer = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT wants
    out = bytearray()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:
        return exc.errno or -1
    try:
        while True:
            try:
                got = os.readv(fd, [buffer])
            except OSError as exc:
                return exc.errno or -1
            if not got:
                return bytes(out)
            out += buffer[:got]
    finally:
        os.close(fd)
        buffer.close()
