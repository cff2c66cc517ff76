"""``csi``: the Kubernetes CSI node plugin (see :mod:`modelfs.csi`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket

import trio

from ..csi.node import NodeOptions
from ..csi.server import serve

log = logging.getLogger("modelfs")


async def cmd_csi(args: argparse.Namespace) -> int:
    """The Kubernetes CSI node plugin, until SIGTERM (mounts stay: see modelfs/csi/)."""
    node_id = args.node_id or os.environ.get("NODE_NAME") or socket.gethostname()
    options = NodeOptions(node_id=node_id, cache_dir=args.cache_dir, state_dir=args.state_dir,
                          publish_timeout=args.publish_timeout, check_interval=args.check_interval)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, options, args.endpoint)
            async for signum in signals:
                log.info("%s: stopping; published mounts keep serving", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    return 0
