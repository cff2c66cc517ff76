"""The background mount daemon's log file: rotated, so months of mounts cannot fill a disk.

``modelfs mount`` without ``--foreground`` writes one, and so do the daemons the CSI plugin
starts (``--log-file``); daemons systemd supervises log to stderr, which its journal rotates.
The file is rotated at a size limit keeping two old copies, and the process's stderr follows
the current file, so a traceback from a bug lands beside the log lines instead of in a
rotated-away (or deleted) file.
"""

from __future__ import annotations

import logging.handlers
import os

from .errors import CacheError
from .mount.table import file_stem
from .settings import BY_NAME

LOG_MAX_BYTES = BY_NAME["log_max_size"].default  # --log-max-size, declared once in settings.py
LOG_BACKUPS = 2


def daemon_log_path(cache_dir: str, mountpoint: str) -> str:
    """Where a background daemon logs: one file per mount point (named by
    :func:`~modelfs.mount.table.file_stem`, so two mount points never share one), beside the cache."""
    directory = os.path.join(cache_dir, "logs")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"cannot create the log directory {directory}: {exc.strerror} (give --cache-dir a writable "
                         "directory)") from None
    return os.path.join(directory, f"{file_stem(mountpoint)}.log")


class DaemonLog(logging.handlers.RotatingFileHandler):
    def __init__(self, path: str, max_bytes: int = LOG_MAX_BYTES) -> None:
        # names from artifacts may hold anything: a log line must never fail to be written
        super().__init__(path, maxBytes=max_bytes, backupCount=LOG_BACKUPS, encoding="utf-8", errors="backslashreplace")
        self._point_stderr_here()

    def doRollover(self) -> None:  # noqa: N802 (logging's name)
        super().doRollover()
        self._point_stderr_here()

    def _point_stderr_here(self) -> None:
        if self.stream is not None:
            self.stream.flush()
            os.dup2(self.stream.fileno(), 2)
