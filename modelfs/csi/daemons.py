"""Mount daemons started by the plugin: one ``modelfs mount --foreground`` per volume.

Each daemon is a process of its own, in a session of its own, so it outlives the plugin's
process: a plugin that crashes or is upgraded in place leaves every pod's mount serving. (In a
container, restarting the plugin's container ends its daemons too; :mod:`.node` then mounts
every recorded target again, see doc/KUBERNETES.md.) The daemon tells the plugin how its start went
on a pipe (``READY`` once a stat through the mount answered, or ``ERROR Kind: message``), as
``modelfs mount`` learns it from its forked daemon.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import trio

from ..errors import ModelfsError, MountError, parse_ready_failure
from ..logfile import daemon_log_path
from ..mount.table import mounted_fuse, umount
from .volume import VolumeSpec

log = logging.getLogger("modelfs.csi")

STAT_SECONDS = 5.0  # a mount whose stat takes longer is frozen, not dead: it is left alone
STOP_SECONDS = 5.0  # after its unmount, a daemon that has not exited by then is killed


class PublishTimeout(ModelfsError):
    """The mount did not answer in the time kubelet gives a publish; kubelet will ask again."""


@dataclass(frozen=True)
class Started:
    pid: int
    pid_started: int
    offline: str | None  # why it serves from the cache alone, if it does
    process: trio.Process


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state first, start time 20th ([] if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()
    except OSError:
        return []


def process_started(pid: int) -> int:
    """The start time of process ``pid`` in clock ticks since boot (0 if it is gone)."""
    fields = _stat_fields(pid)
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # a zombie has exited
        return 0
    return int(fields[19])


def running(pid: int, started: int) -> bool:
    """Whether ``pid`` is still the process that started at ``started`` (not a reused pid)."""
    return pid > 0 and started > 0 and process_started(pid) == started


async def start(spec: VolumeSpec, cache_dir: str, credentials_dir: str) -> Started:
    """Start a daemon mounting ``spec`` at its target; return once the mount answers.

    A failure raises the daemon's own error (AuthenticationError, NotFoundError...); a failure
    or a cancellation (the caller's deadline) leaves nothing mounted or running.
    """
    os.makedirs(spec.target, exist_ok=True)
    log_path = daemon_log_path(cache_dir, spec.target)
    read_end, write_end = os.pipe()
    argv = [sys.executable, "-m", "modelfs", "mount", "--foreground", "--ready-fd", str(write_end),
            "--log-file", log_path, "--cache-dir", cache_dir, "--allow-other", "--view-narrows-config", *spec.mount_flags(),
            spec.reference, spec.target]
    # The pod's credentials, and no one else's: not the node's `modelfs login` nor its Docker config.
    env = dict(os.environ, DOCKER_CONFIG=credentials_dir, XDG_CONFIG_HOME=credentials_dir)
    try:
        with open(log_path, "ab") as log_file:
            process = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file, env=env,
                pass_fds=(write_end,), start_new_session=True)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    pipe = trio.lowlevel.FdStream(read_end)
    try:
        line = await _read_line(pipe)
    except trio.Cancelled:
        with trio.CancelScope(shield=True):
            await _abandon(process, spec.target)
        raise
    finally:
        with trio.CancelScope(shield=True):
            await pipe.aclose()
    if line == "READY" or line.startswith("READY OFFLINE "):
        offline = line.removeprefix("READY OFFLINE ") if line != "READY" else None
        return Started(process.pid, process_started(process.pid), offline, process)
    await _abandon(process, spec.target)
    if line.startswith("ERROR "):
        raise parse_ready_failure(line)
    raise MountError(f"mount daemon exited ({process.returncode}) before the mount was ready: {last_log_line(log_path)}")


async def _read_line(pipe: trio.lowlevel.FdStream) -> str:
    """The daemon's answer; ``NOTE ...`` lines before it (warnings) are logged."""
    data = b""
    while True:
        while not data.endswith(b"\n"):
            chunk = await pipe.receive_some(4096)
            if not chunk:
                break
            data += chunk
        lines = data.decode(errors="replace").splitlines()
        for note in (line for line in lines if line.startswith("NOTE ")):
            log.warning("%s", note.removeprefix("NOTE "))
        answer = [line for line in lines if not line.startswith("NOTE ")]
        if answer or not data.endswith(b"\n"):
            return (answer[0] if answer else "").strip()
        data = b""


async def _abandon(process: trio.Process, target: str) -> None:
    """A start that failed or took too long: no daemon, no mount left behind."""
    if process.returncode is None:
        process.kill()
    with trio.move_on_after(STOP_SECONDS):
        await process.wait()
    if mounted_fuse(target):
        await trio.to_thread.run_sync(umount, target)


def last_log_line(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - 4096))
            lines = handle.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return f"last log line: {lines[-1]}" if lines else "nothing logged"


async def state(target: str) -> str:
    """``serving``, ``dead`` (a modelfs mount whose daemon is gone: ENOTCONN), ``frozen`` (a
    statfs that does not come back), or ``absent`` (nothing mounted there).

    statfs, not stat: the kernel may answer a stat of the mount's root from its attribute
    cache after the daemon died; a statfs always goes to the daemon.
    """
    if not mounted_fuse(target):
        return "absent"
    with trio.move_on_after(STAT_SECONDS):
        try:
            await trio.to_thread.run_sync(os.statvfs, target, abandon_on_cancel=True)
            return "serving"
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                return "dead"
            raise MountError(f"cannot check the mount at {target}: {exc.strerror}") from None
    return "frozen"


async def detach(target: str) -> str:
    """Unmount whatever modelfs mount is at ``target``, dead, frozen or busy; say what was done."""
    if not mounted_fuse(target):
        return "nothing mounted"
    return await trio.to_thread.run_sync(lambda: umount(target, detach_busy=True))


async def stop(pid: int, started: int) -> None:
    """Wait for an unmounted daemon to exit; kill it if it does not."""
    with trio.move_on_after(STOP_SECONDS):
        # Polled: the daemon may have been started by an earlier plugin, not be our child.
        while running(pid, started) and _stat_fields(pid)[:1] != ["T"]:  # a stopped one will not exit  # noqa: ASYNC110
            await trio.sleep(0.05)
        if not running(pid, started):
            return
    log.warning("mount daemon %d did not exit after its unmount; killing it", pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
