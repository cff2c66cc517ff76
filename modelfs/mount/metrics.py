"""Prometheus metrics over plain HTTP on trio (``--metrics 127.0.0.1:9410``).

Counters come from the fetcher and the FUSE layer; the read latency histogram is fed by
:class:`ReadTimer`. The endpoint answers any GET with the text exposition format.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from ..errors import ModelfsError

if TYPE_CHECKING:
    from .fetcher import Fetcher
    from .fs import ModelFS

log = logging.getLogger(__name__)

BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.total += 1
        self.sum += seconds
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1

    def render(self, name: str) -> list[str]:
        lines = [f"# TYPE {name} histogram"]
        lines += [f'{name}_bucket{{le="{bound}"}} {count}' for bound, count in zip(BUCKETS, self.counts)]
        lines += [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.total}"]
        return lines


class ReadTimer:
    def __init__(self, histogram: Histogram) -> None:
        self.histogram = histogram

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.histogram.observe(time.perf_counter() - self.start)


def render(ops: "ModelFS", fetcher: "Fetcher") -> str:
    c = fetcher.counters
    served = ops.bytes_served
    from_cache = max(0, served - c.bytes_fetched)
    inflight = sum(len(r._inflight) for r in fetcher._readers.values())
    metrics = [
        ("modelfs_registry_bytes_total", "counter", "Bytes fetched from the registry", c.bytes_fetched),
        ("modelfs_served_bytes_total", "counter", "Bytes returned to readers", served),
        ("modelfs_cache_served_bytes_total", "counter", "Bytes returned to readers without a fetch", from_cache),
        ("modelfs_cache_hit_ratio", "gauge", "Share of served bytes that needed no fetch", from_cache / served if served else 0.0),
        ("modelfs_reads_total", "counter", "FUSE read requests", ops.reads),
        ("modelfs_read_errors_total", "counter", "FUSE reads answered with EIO", ops.read_errors),
        ("modelfs_fetch_requests_total", "counter", "Range requests sent", c.requests),
        ("modelfs_fetch_retries_total", "counter", "Range requests retried", c.retries),
        ("modelfs_fetch_errors_total", "counter", "Fetches given up", c.errors),
        ("modelfs_cache_write_errors_total", "counter", "Blocks the cache could not store", c.cache_write_errors),
        ("modelfs_integrity_errors_total", "counter", "Fetched blocks or blobs that did not match the index or digest",
         c.integrity_errors),
        ("modelfs_damaged_blocks_total", "counter", "Cached blocks that failed their checksum when read back",
         c.damaged_blocks),
        ("modelfs_handler_errors_total", "counter", "FUSE requests that met an unexpected error (answered EIO)",
         ops.handler_errors),
        ("modelfs_inflight_blocks", "gauge", "Blocks being fetched now", inflight),
    ]
    lines = []
    for name, kind, help_text, value in metrics:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += ops.read_latency.render("modelfs_read_latency_seconds")
    return "\n".join(lines) + "\n"


async def _answer(stream: trio.SocketStream, ops: "ModelFS", fetcher: "Fetcher") -> None:
    try:
        with trio.move_on_after(5):
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 8192:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                request += chunk
            body = render(ops, fetcher).encode()
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                                  b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await stream.aclose()


async def serve_metrics(address: str, ops: "ModelFS", fetcher: "Fetcher",
                        task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    host, _, port = address.rpartition(":")
    try:
        listeners = await trio.open_tcp_listeners(int(port), host=host.strip("[]") or "127.0.0.1")
    except (OSError, ValueError) as exc:
        raise ModelfsError(f"cannot serve metrics on {address}: {exc}") from None
    log.info("metrics on http://%s/metrics", address)
    task_status.started()
    await trio.serve_listeners(lambda stream: _answer(stream, ops, fetcher), listeners)
