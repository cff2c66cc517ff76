"""The kernel's mount table, and unmounting: the one reader of ``/proc/self/mountinfo``.

The kernel writes a mount point there as it resolved it: absolute, every symlink followed,
with spaces, tabs, newlines and backslashes as octal escapes (``\\040``). A path a user or
kubelet gives (``/models/m`` where ``/models`` is a symlink; kubelet's root at
``/var/lib/kubelet -> /data/kubelet``) is compared with it only once :func:`resolve`\\ d the
same way, here, so ``umount``, the CSI plugin's checks, ``status`` and the files named after a
mount point (:func:`file_stem`) all agree on which mount a path means.

Nothing here stats a mount point: its daemon may be frozen, and a stat would hang with it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import MountError

log = logging.getLogger(__name__)

MOUNTINFO = "/proc/self/mountinfo"
MAX_LINK_HOPS = 40  # the kernel's limit on symlinks followed while resolving one path


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    source: str
    device: str  # major:minor, for the FUSE connection's abort file

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith("fuse.")

    @property
    def is_modelfs(self) -> bool:
        return self.fstype == "fuse.modelfs"


_ESCAPE = re.compile(rb"\\([0-7]{3})")


def unescape(field: bytes) -> str:
    """A mountinfo field with its octal escapes undone (``\\040`` is a space), decoded as the
    OS decodes file names (bytes that are not UTF-8 survive as surrogates)."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field))


def parse_line(line: bytes) -> Mount | None:
    """One line of mountinfo: ``id parent major:minor root point options [optional...] - type source super``."""
    fields = line.rstrip(b"\n").split(b" ")
    try:
        sep = fields.index(b"-", 6)
        return Mount(unescape(fields[4]), unescape(fields[sep + 1]), unescape(fields[sep + 2]), fields[2].decode())
    except (ValueError, IndexError):
        return None


def mounts() -> list[Mount]:
    """Every mount of this process's namespace, in mount order (a later one covers an earlier
    one at the same point); read as bytes, so any file name can be in it."""
    try:
        with open(MOUNTINFO, "rb") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    return [m for m in map(parse_line, lines) if m is not None]


def resolve(path: str, points: Iterable[str] | None = None) -> str:
    """``path`` as the mount table would show it: absolute, every symlink followed the way the
    kernel follows it (``link/..`` is the parent of the link's target). Missing components are
    kept as given. A component that is a mount point (of ``points``, else the table's) is not
    looked at: it is a directory, and its daemon may not answer."""
    known = set(points) if points is not None else {m.point for m in mounts()}
    pending = list(reversed(os.path.join(os.getcwd(), path).split("/")))
    current, hops = "/", 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, part)
        if candidate in known:
            current = candidate
            continue
        try:
            target = os.readlink(candidate)  # no stat: a plain directory answers EINVAL at once
        except OSError:
            current = candidate
            continue
        hops += 1
        if hops > MAX_LINK_HOPS:  # a loop: the kernel would say ELOOP; this names no mount
            return os.path.join(candidate, *reversed(pending))
        if target.startswith("/"):
            current = "/"
        pending.extend(reversed(target.split("/")))
    return current


def at(path: str) -> Mount | None:
    """The mount at ``path`` (the topmost, if several are stacked there), or None."""
    table = mounts()
    point = resolve(path, {m.point for m in table})
    found = [m for m in table if m.point == point]
    return found[-1] if found else None


def mounted_fuse(path: str) -> bool:
    found = at(path)
    return found is not None and found.is_fuse


def active_mounts() -> list[tuple[str, str]]:
    """(mount point, source) of every modelfs mount on this host, from mountinfo alone."""
    return [(m.point, m.source) for m in mounts() if m.is_modelfs]


# -- names of the files kept per mount point ---------------------------------------------------

_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")
MAX_STEM_BYTES = 200  # room for a suffix (.json, .log.2) under NAME_MAX (255)


def file_stem(mountpoint: str) -> str:
    """The name of the files kept per mount point (its status file, its daemon's log): the
    resolved path escaped as systemd escapes a path for a unit name (``/models/x-y`` is
    ``models-x\\x2dy``, ``/models/x/y`` is ``models-x-y``), so two mount points never share
    a name; a path that long is cut and made unique with its hash after a ``+``, a character
    the escape never leaves."""
    raw = os.fsencode(resolve(mountpoint)).strip(b"/")
    if not raw:
        return "-"
    escaped = "".join("-" if byte == 0x2F else chr(byte) if byte in _PLAIN and (i or byte != 0x2E) else f"\\x{byte:02x}"
                      for i, byte in enumerate(raw))
    if len(escaped) <= MAX_STEM_BYTES:
        return escaped
    return f"{escaped[:MAX_STEM_BYTES - 33]}+{hashlib.sha256(raw).hexdigest()[:32]}"


# -- unmounting ----------------------------------------------------------------------------------

# An unmount of a daemon that answers returns at once (busy or not); one still waiting after
# this long is stuck on a frozen daemon, whose connection is then aborted.
UMOUNT_SECONDS = 4.0
DETACHED_BUSY = "detached (files were still open)"  # what umount(detach_busy=True) did to a busy mount


def _run_bounded(command: list[str], timeout: float) -> tuple[bool, str]:
    """Run an unmount command; (succeeded, what it said). A command stuck on a frozen
    daemon is killed after ``timeout`` seconds."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"{command[0]} did not return within {timeout:g}s"
    except OSError as exc:
        return False, f"cannot run {command[0]}: {exc.strerror}"
    return result.returncode == 0, result.stderr.strip() or f"exit status {result.returncode}"


def _abort_connection(device: str) -> bool:
    """Abort the FUSE connection of a frozen or dead daemon (as the kernel's fusectl allows
    root): every request waiting on it fails at once, so the unmount can proceed."""
    minor = device.partition(":")[2]
    try:
        with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as handle:
            handle.write("1")
        return True
    except OSError:
        return False


def umount(mountpoint: str, timeout: float = UMOUNT_SECONDS, detach_busy: bool = False) -> str:
    """Unmount, and always return: a dead daemon (ENOTCONN) or a frozen one (SIGSTOP) gets
    its connection aborted where permitted and a lazy unmount. Returns what was done.

    A live daemon with files open is refused, unless ``detach_busy`` (the CSI plugin: kubelet
    wants the target gone): then the mount is detached lazily, and its daemon serves the open
    files until they close, then exits."""
    found = at(mountpoint)
    if found is None or not found.is_modelfs:  # another FUSE filesystem is not ours to unmount
        raise MountError(f"{mountpoint} is not a modelfs mount")
    point = found.point  # resolved: umount(8) and fusermount3 get the path the kernel knows
    root = os.geteuid() == 0
    ok, said = _run_bounded(["umount", point] if root else ["fusermount3", "-u", point], timeout)
    if ok:
        return "unmounted"
    busy = "busy" in said.lower()
    if busy and not detach_busy:  # a live daemon with open files: not ours to break
        raise MountError(f"cannot unmount {mountpoint}: {said} (close the files open in it first)")
    aborted = not busy and _abort_connection(found.device)
    lazy_ok, lazy_said = _run_bounded(["umount", "-l", point] if root else ["fusermount3", "-uz", point], timeout)
    if not lazy_ok:
        raise MountError(f"cannot unmount {mountpoint}: {said}; lazily: {lazy_said}")
    if busy:
        return DETACHED_BUSY
    log.info("unmount of %s needed a lazy detach (%s)%s", point, said, "; connection aborted" if aborted else "")
    return "cleaned stale mount (its daemon was not answering)"
