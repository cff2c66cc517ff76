"""The daemon stops promptly on SIGTERM and on unmount, whatever is in flight: a read waiting
on a block from a trickling registry, prefetch, a lazy unmount (``umount -l``) before the
signal. Real registry, real fault proxy, real mounts through the CLI, readers in their own
processes (a read blocked in FUSE holds its process in the kernel until answered)."""

from __future__ import annotations

import hashlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import daemon_pid
from proxy import pipe, stop_listening

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


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie its reaper has not collected yet has: this host's
    init reaps the daemons ``modelfs mount`` leaves behind a second or two late)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, seconds: float) -> float | None:
    """Seconds until ``pid`` exited (None: still running after ``seconds``)."""
    started = time.monotonic()
    while not _exited(pid):
        if time.monotonic() - started > seconds:
            return None
        time.sleep(0.02)
    return time.monotonic() - started


def _mounted(target: Path) -> bool:
    with open("/proc/self/mountinfo") as handle:
        return any(line.split()[4] == str(target) for line in handle)


@pytest.fixture(scope="module")
def weights_digest(minilm_dir) -> str:
    """The weights' blob (a raw layer: its digest is the file's), the one blob faults are put on:
    the mount, and prefetch of the small files, go on undisturbed."""
    return "sha256:" + hashlib.sha256((minilm_dir / "model.safetensors").read_bytes()).hexdigest()


def _reader(target: Path, offset: int) -> subprocess.Popen:
    """A process in the middle of a read of ``model.safetensors`` at ``offset``."""
    reader = subprocess.Popen([sys.executable, "-c", READER, str(target / "model.safetensors"), str(offset)],
                              stdout=subprocess.PIPE, text=True)
    assert reader.stdout is not None and reader.stdout.readline().strip() == "open"
    time.sleep(0.5)  # in the read now, waiting on the daemon for a block that is slow to come
    assert reader.poll() is None
    return reader


@pytest.mark.parametrize("lazy", [True, False], ids=["after-umount-l", "mounted"])
def test_sigterm_stops_a_daemon_with_a_read_waiting_on_a_trickling_registry(lazy, faulty, mounts, minilm_ref,
                                                                            registry, weights_digest):
    """The benchmark's teardown: a loader reading through the mount, prefetch running, the
    registry slow; ``umount -l``, then SIGTERM. The daemon waited for the read's --timeout
    (30 s) before it even cancelled its transfers; now it is gone within a second or two."""
    faulty.only, faulty.persistent = weights_digest, "trickle"  # from the start: prefetch cannot fetch the block first
    target, pid = mounts.mount_daemon(minilm_ref.replace(registry.address, faulty.address), "--prefetch", "all",
                                      "--timeout", "30")
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
        if not _exited(pid):  # the old code: release the reader, held in the kernel until the daemon answers
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
        assert _mounted(target) and not _exited(new)
        assert (target / "config.json").read_bytes() == (minilm_dir / "config.json").read_bytes()
    finally:
        os.close(held)
    mounts.umount(target)
    assert _wait_gone(new, 6) is not None


def test_the_exit_deadline_gives_up_on_a_stuck_thread_and_is_disarmed_by_a_clean_exit():
    """The last bound: armed at the stop (the earliest arming stands), disarmed once all ended."""
    from modelfs.mount.shutdown import ExitDeadline
    exits: list[int] = []
    fired = threading.Event()
    deadline = ExitDeadline(lambda code: (exits.append(code), fired.set()))
    deadline.arm(0.05, 7)
    deadline.arm(0.01, 1)  # a later arming changes nothing
    assert fired.wait(2) and exits == [7]
    clean = ExitDeadline(exits.append)
    clean.arm(0.05, 0)
    clean.disarm()
    time.sleep(0.2)
    assert exits == [7]


def test_umount_l_alone_ends_the_daemon_once_its_last_reader_is_done(faulty, mounts, minilm_ref, registry,
                                                                     weights_digest):
    """No signal: after ``umount -l`` the daemon serves the reads of files still open, and exits
    by itself once the last one is closed (the FUSE connection is gone), prefetch or not.
    (A guard: the old code did this too.)"""
    faulty.stall_seconds = 0.5
    faulty.only, faulty.persistent = weights_digest, "stall"
    target, pid = mounts.mount_daemon(minilm_ref.replace(registry.address, faulty.address), "--prefetch", "all",
                                      "--timeout", "30")
    reader = _reader(target, 60 * MiB)
    try:
        subprocess.run(["umount", "-l", str(target)], check=True)
        mounts.active.remove(target)
        said, _ = reader.communicate(timeout=10)
        assert said.split() == ["read", str(MiB)], said
        took = _wait_gone(pid, 6)
        assert took is not None and took < 3, f"daemon still running {took or 6:.1f}s after its last reader left"
        assert not os.path.exists(status_path(str(target)))
    finally:
        if not _exited(pid):
            os.kill(pid, signal.SIGKILL)
        reader.kill()
        reader.wait()
        faulty.persistent = None


class SynDroppingProxy:
    """A loopback forwarder to the registry that, after :meth:`drop_new`, accepts no connection
    and keeps its accept queue full: a new connect hangs in SYN retries, as to a host whose
    packets are dropped (connections made before keep forwarding). A worker thread in
    ``connect()`` has no socket a transfer's abort could shut down."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self._server = socket.create_server(("127.0.0.1", 0), backlog=1)
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"
        self._dropping = threading.Event()
        self._queued: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._dropping.is_set():
            if not select.select([self._server], [], [], 0.05)[0] or self._dropping.is_set():
                continue
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=pipe, args=(source, sink), daemon=True).start()

    def drop_new(self) -> None:
        self._dropping.set()
        time.sleep(0.1)  # the accept loop has stopped
        host, port = self._server.getsockname()
        for _ in range(8):  # fill the accept queue: the first connect that does not complete finds it full
            sock = socket.socket()
            sock.settimeout(0.3)
            try:
                sock.connect((host, port))
            except OSError:
                sock.close()
                return
            self._queued.append(sock)
        raise AssertionError("the accept queue never filled")

    def close(self) -> None:
        stop_listening(self._server)
        for sock in self._queued:
            sock.close()


def test_sigterm_exits_within_its_bound_while_a_worker_hangs_in_connect(registry, mounts, minilm_ref, cli):
    """The last bound, with real parts: the registry's host stops answering SYNs, a read's
    worker thread hangs in ``connect()`` for the socket timeout (30 s), which no abort can cut
    short; SIGTERM still ends the daemon within the grace plus the exit bound (3 s), the mount
    gone and the status file removed."""
    proxy = SynDroppingProxy(registry.port)
    try:
        target, pid = mounts.mount_daemon(minilm_ref.replace(registry.address, proxy.address), "--prefetch", "none",
                                          "--timeout", "30")
        proxy.drop_new()
        reader = _reader(target, 60 * MiB)
        try:
            os.kill(pid, signal.SIGTERM)
            took = _wait_gone(pid, 8)  # 3 s by design (grace + exit bound); the rest is slack for a loaded host
            assert took is not None and took < 5, f"daemon still running {took or 8:.1f}s after SIGTERM"
            assert not _mounted(target)
            mounts.active.remove(target)
            assert not os.path.exists(status_path(str(target)))
            log = "".join(path.read_text() for path in (cli.cache_dir / "logs").iterdir())
            assert "exiting without waiting" in log
        finally:
            if not _exited(pid):
                os.kill(pid, signal.SIGKILL)
            reader.kill()
            reader.wait()
    finally:
        proxy.close()
