"""How a command stopped by a signal ends: Ctrl-C (SIGINT) and SIGTERM (``kill``, systemd,
a container runtime) take one path, and the user reads one line saying what was stopped and
what it left, with the conventional status 128 + the signal (130, 143).

SIGTERM is turned into what Ctrl-C does rather than handled beside it: inside ``trio.run``
the SIGINT handler is trio's, which raises ``KeyboardInterrupt`` only where that is safe and
otherwise hands it to the main task, so every ``except BaseException`` clean-up that already
runs on Ctrl-C (an extract's staging directory removed, a pull's record never written) runs
on SIGTERM too. Python's default SIGTERM ends the process at once, silently, with none of it.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

_received: list[int] = []  # the signal that stopped the command, if it was not Ctrl-C
_trio_ctrl_c: list[Callable[[int, FrameType | None], Any]] = []  # trio's SIGINT handler where SIGINT is ignored

# What a stopped command leaves, by command: true because each writes its record last (pull:
# once every block is read back and checked, modelfs/commands/models.py; extract: the move out
# of its staging directory, modelfs/artifact/staging.py; push: the manifest after every blob,
# modelfs/artifact/push.py).
_LEFT = {
    "pull": "nothing is recorded as pulled; the blocks it checked into the cache are kept and the next pull "
            "reuses them",
    "extract": "its staging directory is removed and nothing is moved into --output",
    "push": "the tag is written last, so it was not moved; blobs already uploaded are skipped by the next push",
}
_DEFAULT_LEFT = "nothing half-done is kept as if complete"


def stop_on_sigterm() -> None:
    """SIGTERM from now on stops the command as Ctrl-C does (not for a mount, whose daemon
    shuts down its own way: modelfs/mount/shutdown.py)."""
    signal.signal(signal.SIGTERM, _as_ctrl_c)


def run_stoppable(command: Callable[[Any], Awaitable[int]], args: Any) -> int:
    """``trio.run`` of a command. Where SIGINT is ignored (a background job of a shell
    script) trio installs no handler of its own, and a ``KeyboardInterrupt`` raised at any
    frame breaks its run (measured: a SIGTERMed ``push &`` printed pages of "must be called
    from async context"); so trio is let install it, SIGTERM keeps it, and SIGINT is ignored
    again once the run has begun. A command that takes SIGTERM its own way (``csi``) is run
    as it was."""
    import trio

    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is _as_ctrl_c
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    async def run() -> int:
        handler = signal.getsignal(signal.SIGINT)
        if ignored and callable(handler):
            _trio_ctrl_c.append(handler)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return await command(args)

    return trio.run(run)


def _as_ctrl_c(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    handler = _trio_ctrl_c[0] if _trio_ctrl_c else signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)  # trio's while trio runs, else Python's default
    else:
        raise KeyboardInterrupt


def stopped(command: str | None, target: str | None) -> int:
    """The one line for a command stopped by SIGINT or SIGTERM, and its exit status."""
    signum = _received[0] if _received else signal.SIGINT
    name = "SIGINT, Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    what = " ".join(part for part in (command, "of" if command and target else None, target) if part) or "command"
    left = _LEFT.get(command or "", _DEFAULT_LEFT)
    print(f"modelfs: error: {what} stopped ({name}); {left}", file=sys.stderr)
    return 128 + signum
