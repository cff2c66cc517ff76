"""Prometheus metrics over plain HTTP on trio (``--metrics 127.0.0.1:9410``).

Everything comes from the mount's one :class:`~modelfs.mount.stats.Stats`. The endpoint
answers any GET with the text exposition format.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from ..errors import ModelfsError

if TYPE_CHECKING:
    from .stats import Stats

log = logging.getLogger(__name__)


def render(c: Stats) -> str:
    served = c.bytes_served
    from_cache = max(0, served - c.bytes_fetched)
    metrics = [
        ("modelfs_registry_bytes_total", "counter", "Bytes fetched from the registry", c.bytes_fetched),
        ("modelfs_served_bytes_total", "counter", "Bytes returned to readers", served),
        ("modelfs_cache_served_bytes_total", "counter", "Bytes returned to readers without a fetch", from_cache),
        ("modelfs_cache_hit_ratio", "gauge", "Share of served bytes that needed no fetch", from_cache / served if served else 0.0),
        ("modelfs_reads_total", "counter", "FUSE read requests", c.reads),
        ("modelfs_read_errors_total", "counter", "FUSE reads answered with EIO", c.read_errors),
        ("modelfs_fetch_requests_total", "counter", "Range requests sent", c.requests),
        ("modelfs_fetch_retries_total", "counter", "Range requests retried", c.retries),
        ("modelfs_fetch_errors_total", "counter", "Fetches given up", c.errors),
        ("modelfs_cache_write_errors_total", "counter", "Blocks the cache could not store", c.cache_write_errors),
        ("modelfs_integrity_errors_total", "counter", "Fetched blocks or blobs that did not match the index or digest",
         c.integrity_errors),
        ("modelfs_damaged_blocks_total", "counter", "Cached blocks that failed their checksum when read back",
         c.damaged_blocks),
        ("modelfs_handler_errors_total", "counter", "FUSE requests that met an unexpected error (answered EIO)",
         c.handler_errors),
        ("modelfs_inflight_blocks", "gauge", "Blocks being fetched now", c.inflight_blocks),
        ("modelfs_fetch_workers", "gauge", "Threads that receive, check and store blocks", c.workers),
    ]
    lines = []
    for name, kind, help_text, value in metrics:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += c.read_latency.render("modelfs_read_latency_seconds")
    return "\n".join(lines) + "\n"


async def _answer(stream: trio.abc.Stream, stats: Stats) -> None:
    try:
        with trio.move_on_after(5):
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 8192:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                request += chunk
            body = render(stats).encode()
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                                  b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await stream.aclose()


async def serve_metrics(address: str, stats: Stats,
                        task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    host, _, port = address.rpartition(":")
    try:
        listeners = await trio.open_tcp_listeners(int(port), host=host.strip("[]") or "127.0.0.1")
    except (OSError, ValueError) as exc:
        raise ModelfsError(f"cannot serve metrics on {address}: {exc}") from None
    log.info("metrics on http://%s/metrics", address)
    task_status.started()
    async def answer(stream: trio.SocketStream) -> None:
        await _answer(stream, stats)

    await trio.serve_listeners(answer, listeners)
