"""``status``, ``metrics`` and ``umount``: the mounts of this host, read from the mount table
and the status files their daemons write, never through a mount (a frozen daemon cannot hang
them). Light: none of the mount's data path is loaded."""

from __future__ import annotations

import argparse
import json
from typing import Any

import trio

from ..mount import status as mount_status
from ..mount.metrics import render_host, serve_metrics
from ..mount.table import active_mounts, umount


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
        line = mount_status.MountStatus(**{k: v for k, v in mount.items() if k not in ("source", "answering")})
        stale = "" if mount["answering"] else ", NOT ANSWERING"
        print(f"{mount['mountpoint']}: {mount['reference']} ({line.digest[:19]}), pid {line.pid}: "
              f"{line.progress_line()}{stale}")
    return 0


def _host_metrics() -> str:
    mounts = [mount_status.read(point) or {"mountpoint": point, "answering": False} for point, _ in active_mounts()]
    return render_host(mounts)


async def cmd_metrics(args: argparse.Namespace) -> int:
    """The metrics of every modelfs mount of this host, from one place: printed once, or
    served (``--listen``) for Prometheus, instead of one port per mount."""
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
