"""The directories a command was given (the block cache, the local store, the CSI plugin's
state), checked before anything is written there, so a mistake is one line naming the
directory and the flag that sets it, not a traceback from whatever touched it first.

Writability is tried, not inferred from mode bits: root writes to a 0555 directory, nobody
writes to a read-only filesystem, and ACLs or NFS squashing decide for themselves.
"""

from __future__ import annotations

import os
import tempfile

from .errors import ModelfsError


class DirectoryError(ModelfsError):
    """A directory a command needs is not one, or cannot be written."""


def default_cache_dir() -> str:
    """Where the block cache lives unless told (``--cache-dir``, ``MODELFS_CACHE_DIR``, the
    config's ``cache_dir``): the host's for root, the user's own otherwise."""
    if os.geteuid() == 0:
        return "/var/cache/modelfs"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "modelfs")


def check_directory(path: str, what: str, flag: str, write: bool) -> None:
    """Refuse ``path`` unless it is a directory (or, for ``write``, can become one) that this
    process can create files in. ``what`` names it for the user ("cache directory") and
    ``flag`` says how to choose another. A directory only read may be missing."""
    fix = f"choose another with {flag}"
    if os.path.lexists(path) and not os.path.isdir(path):
        raise DirectoryError(f"{what} {path} is not a directory ({fix})")
    if not write:
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise DirectoryError(f"cannot create {what} {path}: {exc.strerror} ({fix})") from None
    try:
        handle, probe = tempfile.mkstemp(prefix=".modelfs-write-check-", dir=path)
    except OSError as exc:
        raise DirectoryError(f"{what} {path} is not writable: {exc.strerror} ({fix})") from None
    os.close(handle)
    os.unlink(probe)
