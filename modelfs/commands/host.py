"""``status``, ``metrics`` and ``umount``: the mounts of this host, read from the mount table
and the status files their daemons write, never through a mount (a frozen daemon cannot hang
them). Light: none of the mount's data path is loaded."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from ..mount import status as mount_status
from ..mount.table import active_mounts, umount

_STATUS_FIELDS = {field.name for field in dataclasses.fields(mount_status.MountStatus)}


def _progress(found: dict[str, Any]) -> str:
    """The progress line of a status file, read with the fields this version knows: a daemon
    of another version (an upgrade while mounts run) may write more, or fewer."""
    try:
        status = mount_status.MountStatus(**{k: v for k, v in found.items() if k in _STATUS_FIELDS})
    except TypeError:
        return "status written by another version of modelfs (see `modelfs status --json`)"
    return status.progress_line()


def cmd_status(args: argparse.Namespace) -> int:
    """Every modelfs mount of this host, from mountinfo and the status file its daemon writes
    each second (never from the mount itself: a frozen daemon cannot hang this)."""
    mounts: list[dict[str, Any]] = []
    for point, source in active_mounts():
        found = mount_status.read(point)
        if found is None:
            mounts.append({"mountpoint": point, "source": source, "answering": False})
        else:
            mounts.append({"source": source, **found})
    if args.json:
        print(json.dumps(mounts, indent=2))
        return 0
    if not mounts:
        print("No modelfs mounts")
    for mount in mounts:
        if "pid" not in mount:
            print(f"{mount['mountpoint']}: {mount['source']} (no status: its daemon is gone or stopped answering)")
            continue
        stale = "" if mount["answering"] else ", NOT ANSWERING"
        print(f"{mount['mountpoint']}: {mount.get('reference', mount['source'])} ({str(mount.get('digest'))[:19]}), "
              f"pid {mount['pid']}: {_progress(mount)}{stale}")
    return 0


def _host_metrics() -> str:
    from ..mount.metrics import render_host  # trio's import: only for metrics, not status or umount

    mounts = [mount_status.read(point) or {"mountpoint": point, "answering": False} for point, _ in active_mounts()]
    return render_host(mounts)


async def cmd_metrics(args: argparse.Namespace) -> int:
    """The metrics of every modelfs mount of this host, from one place: printed once, or
    served (``--listen``) for Prometheus, instead of one port per mount."""
    import trio

    from ..mount.metrics import serve_metrics

    if args.listen is None:
        print(_host_metrics(), end="")
        return 0
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_metrics, args.listen, _host_metrics)
        print(f"Serving the metrics of every modelfs mount on http://{args.listen}/metrics", flush=True)
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    print(f"{umount(args.mountpoint).capitalize()} {args.mountpoint}")
    return 0
