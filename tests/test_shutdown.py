"""The daemon stops promptly on SIGTERM and on unmount, whatever is in flight: a read waiting
on a block from a trickling registry, prefetch, a lazy unmount (``umount -l``) before the
signal. Real registry, real fault proxy, real mounts through the CLI, readers in their own
processes (a read blocked in FUSE holds its process in the kernel until answered)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import daemon_alive, daemon_pid

from modelfs.mount.status import status_path

MiB = 1 << 20

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")

# Reads 1 MiB at an offset with O_DIRECT (no page cache between it and the daemon) and says how it went.
READER = ("import mmap, os, sys\n"
          "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)\n"
          "buf = mmap.mmap(-1, 1 << 20)\n"
          "print('open', flush=True)\n"
          "try:\n"
          "    print('read', os.preadv(fd, [buf], int(sys.argv[2])), flush=True)\n"
          "except OSError as exc:\n"
          "    print('error', exc.errno, flush=True)\n")


def _wait_gone(pid: int, seconds: float) -> float | None:
    """Seconds until ``pid`` exited (None: still running after ``seconds``)."""
    started = time.monotonic()
    while daemon_alive(pid):
        if time.monotonic() - started > seconds:
            return None
        time.sleep(0.02)
    return time.monotonic() - started


def _mounted(target: Path) -> bool:
    with open("/proc/self/mountinfo") as handle:
        return any(line.split()[4] == str(target) for line in handle)


def _reader(target: Path, offset: int) -> subprocess.Popen:
    """A process in the middle of a read of ``model.safetensors`` at ``offset``."""
    reader = subprocess.Popen([sys.executable, "-c", READER, str(target / "model.safetensors"), str(offset)],
                              stdout=subprocess.PIPE, text=True)
    assert reader.stdout is not None and reader.stdout.readline().strip() == "open"
    time.sleep(0.5)  # in the read now, waiting on a block that trickles
    assert reader.poll() is None
    return reader


@pytest.mark.parametrize("lazy", [True, False], ids=["after-umount-l", "mounted"])
def test_sigterm_stops_a_daemon_with_a_read_waiting_on_a_trickling_registry(lazy, faulty, mounts, minilm_ref,
                                                                            registry):
    """The benchmark's teardown: a loader reading through the mount, prefetch running, the
    registry slow; ``umount -l``, then SIGTERM. The daemon waited for the read's --timeout
    (30 s) before it even cancelled its transfers; now it is gone within a second or two."""
    target, pid = mounts.mount_daemon(minilm_ref.replace(registry.address, faulty.address), "--prefetch", "all",
                                      "--timeout", "30")
    faulty.persistent = "trickle"
    reader = _reader(target, 60 * MiB)
    try:
        if lazy:
            subprocess.run(["umount", "-l", str(target)], check=True)
        os.kill(pid, signal.SIGTERM)
        took = _wait_gone(pid, 6)
        assert took is not None and took < 3, f"daemon still running {took or 6:.1f}s after SIGTERM"
        assert not _mounted(target)
        mounts.active.remove(target)
        assert not os.path.exists(status_path(str(target)))
        said, _ = reader.communicate(timeout=5)  # answered at once: an error, never bytes it did not get
        assert said.startswith("error"), said
    finally:
        if daemon_alive(pid):  # the old code: release the reader, held in the kernel until the daemon answers
            os.kill(pid, signal.SIGKILL)
        reader.kill()
        reader.wait()
        faulty.persistent = None


def test_exit_of_a_lazily_unmounted_daemon_leaves_the_new_mount_at_its_point_alone(mounts, minilm_ref, minilm_dir,
                                                                                  cli):
    """Kubelet unpublishes (``umount -l``: a file is still open) and publishes again at the same
    target; then the old daemon is stopped. Its unmount at exit detached whatever the path held:
    the new mount."""
    target, old = mounts.mount_daemon(minilm_ref, "--prefetch", "none", name="again")
    held = os.open(target / "config.json", os.O_RDONLY)  # keeps the detached mount's connection alive
    try:
        subprocess.run(["umount", "-l", str(target)], check=True)
        new = daemon_pid(cli.run("mount", "--plain-http", "--prefetch", "none", minilm_ref, str(target),
                                 timeout=60).stdout)
        os.kill(old, signal.SIGTERM)
        assert _wait_gone(old, 6) is not None
        time.sleep(0.3)  # the new mount's daemon would be ending now if its mount had been detached
        assert _mounted(target) and daemon_alive(new)
        assert (target / "config.json").read_bytes() == (minilm_dir / "config.json").read_bytes()
    finally:
        os.close(held)
    mounts.umount(target)
    assert _wait_gone(new, 6) is not None


def test_the_exit_deadline_gives_up_on_a_stuck_thread_and_is_disarmed_by_a_clean_exit():
    """The last bound: a thread nothing interrupts cannot hold the process past it."""
    from modelfs.mount import shutdown
    exits: list[int] = []
    fired = threading.Event()
    shutdown.bound_exit(0.05, 7, lambda code: (exits.append(code), fired.set()))
    assert fired.wait(2) and exits == [7]
    shutdown.bound_exit(0.05, 0, exits.append).cancel()
    time.sleep(0.2)
    assert exits == [7]
