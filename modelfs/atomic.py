"""Files written whole: a reader sees the old content or the new one, never half of either.

Used by everything that keeps a small document a crash must not tear: the local store's
index (:mod:`modelfs.artifact.layout`), the credentials file (:mod:`modelfs.credentials`), the
CSI plugin's volume records (:mod:`modelfs.csi.records`) and the cache's model records
(:mod:`modelfs.storage.records`). It sits at the top of the package, below all of them, so
none of them imports another's module for it.
"""

from __future__ import annotations

import os
import tempfile


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write a whole file so that readers see the old or the new content, never half."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".tmp")  # a leftover is plain to see
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
