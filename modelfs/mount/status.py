"""A mount's state where tools can read it without asking the mount.

Each daemon writes a small JSON file every second, replaced atomically, in the run
directory (``/run/modelfs`` as root, else ``$XDG_RUNTIME_DIR/modelfs``), named after its
mount point: pid, reference and digest, offline or not, bytes local and total (prefetch
progress), whether the metadata read ahead is ready, integrity and read errors. ``modelfs
status`` reads these files and never touches a mount, so a frozen daemon cannot hang it;
systemd gets the same progress as ``STATUS=``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .table import file_stem

STALE_SECONDS = 5.0  # a file this old belongs to a daemon that stopped answering


def run_dir() -> str:
    if os.geteuid() == 0:
        return "/run/modelfs"
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(tempfile.gettempdir(), f"modelfs-{os.getuid()}")
    return os.path.join(base, "modelfs")


def status_path(mountpoint: str) -> str:
    """The status file of a mount point, named by :func:`~.table.file_stem` (one per mount point)."""
    return os.path.join(run_dir(), f"{file_stem(mountpoint)}.json")


@dataclass
class MountStatus:
    pid: int
    mountpoint: str
    reference: str
    digest: str
    offline: str | None  # why the registry could not be asked, when serving from the cache
    bytes_total: int
    bytes_local: int
    reads: int
    read_errors: int
    integrity_errors: int
    damaged_blocks: int
    handler_errors: int
    bytes_fetched: int
    workers: int
    started: float
    updated: float
    signatures: str | None = None  # the signature verdict in one line, under a signature policy
    signatures_met: int | None = None  # 1 when the policy was met, 0 when served anyway (warn)
    metadata: str | None = None  # the metadata read ahead (configs, headers): "ready (7 files, 412 KiB) in 0.4 s"
    metadata_seconds: float | None = None  # how long that took, once ready

    def progress_line(self) -> str:
        """One line for systemd's STATUS= and the text of ``modelfs status``."""
        share = self.bytes_local / self.bytes_total if self.bytes_total else 1.0
        line = f"{share:.0%} local ({self.bytes_local / 1e9:,.2f} of {self.bytes_total / 1e9:,.2f} GB)"
        if self.integrity_errors or self.read_errors:
            line += f", {self.integrity_errors} integrity errors, {self.read_errors} read errors"
        if self.metadata:
            line += f", metadata {self.metadata}"
        if self.offline:
            line += ", OFFLINE: serving the cached copy"
        if self.signatures_met == 0:
            line += f", UNSIGNED: {self.signatures}"
        return line


def signature_fields(verdict: Any, gate: Any = None) -> dict[str, Any]:
    """The status fields of a signature verdict (modelfs/signing/), none without a policy; a
    signed file whose bytes differ from its statement (``gate``: mount/filecheck.py) turns
    them to not met, naming it."""
    if verdict is None:
        return {}
    failures = gate.failures if gate is not None else []
    if failures:
        return {"signatures": "; ".join(failures[:2]), "signatures_met": 0}
    return {"signatures": verdict.summary(), "signatures_met": int(verdict.met)}


def write(status: MountStatus, path: str | None = None) -> None:
    path = path or status_path(status.mountpoint)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as handle:
        json.dump(asdict(status), handle)
    os.replace(tmp, path)


def remove(mountpoint: str, path: str | None = None) -> None:
    try:
        os.unlink(path or status_path(mountpoint))
    except OSError:
        pass


def read(mountpoint: str) -> dict[str, Any] | None:
    """The last status a mount's daemon wrote, with ``answering`` false when it is stale."""
    try:
        with open(status_path(mountpoint)) as handle:
            found: dict[str, Any] = json.load(handle)
    except (OSError, ValueError):
        return None
    found["answering"] = time.time() - found.get("updated", 0) < STALE_SECONDS
    return found


async def keep_writing(collect: Callable[[], MountStatus], notify: Callable[[str], None]) -> None:
    """Write the status every second until cancelled (unmount), and tell systemd."""
    import trio
    last_line = ""
    first = collect()
    path = status_path(first.mountpoint)  # once: it reads the mount table
    try:
        while True:
            status = collect()
            try:
                write(status, path)
            except OSError:
                pass  # a read-only /run costs the status, never the mount
            line = status.progress_line()
            if line != last_line:
                notify(f"STATUS={line}")
                last_line = line
            await trio.sleep(1.0)
    finally:
        remove(first.mountpoint, path)
