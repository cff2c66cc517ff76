"""Stopping a mount daemon promptly, whatever is in flight.

An operator stops a daemon with SIGTERM (``systemctl stop``, kubelet, after an ``umount -l``
of a stuck mount) and expects it gone in seconds. Three things could hold it:

1.  ``pyfuse3.terminate()`` only stops taking requests: ``pyfuse3.main`` still waits for the
    requests in flight, and a read waiting on a block from a stalled or trickling registry
    waits its whole ``--timeout`` (30 s by default; measured: a SIGTERM after ``umount -l``
    with one read waiting took 30 s, the benchmark's teardown gave up and SIGKILLed after
    10 s). So the requests in flight get :data:`STOP_GRACE_SECONDS` to finish (a block from
    the cache, a registry that answers), then are cancelled (:func:`watch_signals`).
2.  Once the FUSE loop has ended, the mount's tasks are cancelled, and cancelling a fetch
    aborts its transfer (its socket shut down: :mod:`.transfers`), so the worker threads
    return at once (measured: the daemon gone 1.0 s after SIGTERM, the grace included). A
    thread nothing can interrupt (a ``connect()`` to a host that drops packets, which has no
    socket to shut down yet; hashing a blob whole; a write to a hung disk) is abandoned with
    the process :data:`EXIT_SECONDS` after the grace (:class:`ExitDeadline`): by then the
    mount is gone and the status file removed.
3.  The unmount at exit unmounts the daemon's own mount only (:func:`unmount_own`): after an
    ``umount -l`` the mount point may hold another mount already (kubelet publishing the
    volume again), which the old daemon's exit must leave alone.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

import pyfuse3
import trio

from . import table

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# How long FUSE requests in flight may finish after a stop signal before they are cancelled
# (the kernel then fails them when the connection closes); a second signal cancels at once.
STOP_GRACE_SECONDS = 1.0
# How long the mount's tasks may take to end once the FUSE loop has: cancelled transfers end
# within milliseconds; only a thread nothing interrupts is still running past this.
EXIT_SECONDS = 2.0


class ExitDeadline:
    """The one bound on a stopping daemon: armed when the stop begins (a signal, or the FUSE
    loop ending), disarmed once the mount's tasks have all ended; the earliest arming stands."""

    def __init__(self, exit_now: Callable[[int], object] = os._exit) -> None:
        self._exit_now = exit_now
        self._timer: threading.Timer | None = None

    def arm(self, seconds: float, code: int) -> None:
        if self._timer is None:
            self._timer = bound_exit(seconds, code, self._exit_now)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


async def watch_signals(fuse_loop: trio.CancelScope, notify: Callable[[str], None], deadline: ExitDeadline,
                        grace: float = STOP_GRACE_SECONDS) -> None:
    """On SIGTERM, SIGINT or SIGHUP end the FUSE loop (``fuse_loop``: the scope ``pyfuse3.main``
    runs in): no new request is taken; those in flight are cancelled after ``grace`` seconds,
    or at a second signal. The process is gone within ``grace`` + :data:`EXIT_SECONDS`."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async for signum in signals:
            log.info("received %s; unmounting", signal.Signals(signum).name)
            deadline.arm(grace + EXIT_SECONDS, 0)
            notify("STOPPING=1")
            pyfuse3.terminate()
            break
        with trio.move_on_after(grace):
            async for signum in signals:
                log.info("received %s again; not waiting for requests in flight", signal.Signals(signum).name)
                break
        log.info("cancelling the requests still in flight (their readers get an error)")
        fuse_loop.cancel()


def mount_device(mountpoint: str) -> str | None:
    """The device (major:minor) of the mount just made at ``mountpoint``: what tells it from
    a mount made there later by someone else."""
    found = table.at(mountpoint)
    return found.device if found is not None else None


def unmount_own(mountpoint: str, device: str | None) -> None:
    """Close the FUSE session, unmounting ``mountpoint`` only while it is still this daemon's
    mount (``device``). libfuse's unmount is a lazy one of whatever the path holds, and after
    an ``umount -l`` that may be a newer mount at the same point."""
    found = table.at(mountpoint)
    own = device is None or (found is not None and found.device == device)
    if not own:
        log.info("%s is no longer this daemon's mount (detached already%s); leaving it alone", mountpoint,
                 "; another mount is there now" if found is not None else "")
    pyfuse3.close(unmount=own)


def bound_exit(seconds: float, code: int, exit_now: Callable[[int], object] = os._exit) -> threading.Timer:
    """Exit the process with ``code`` if it is still running ``seconds`` from now (a thread that
    nothing can interrupt is holding the mount's nursery open). Its message goes straight to
    stderr (the daemon's log): the logging locks may be held by the thread it gives up on."""
    def give_up() -> None:
        busy = sorted(t.name for t in threading.enumerate() if t is not threading.current_thread() and t.is_alive())
        line = (f"modelfs: still running {seconds:g}s after the stop began ({', '.join(busy) or 'nothing'}); "
                "exiting without waiting\n")
        try:
            os.write(2, line.encode("utf-8", "backslashreplace"))
        except OSError:
            pass
        exit_now(code)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.name = "modelfs-exit-deadline"
    timer.start()
    return timer
