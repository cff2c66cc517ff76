"""Prometheus metrics over plain HTTP on trio (``--metrics 127.0.0.1:9410``).

Everything comes from the mount's one :class:`~modelfs.mount.stats.Stats`. The endpoint
answers any GET with the text exposition format.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ..errors import ModelfsError
from .stats import BUCKETS, Histogram, Stats

log = logging.getLogger(__name__)


def label_text(labels: dict[str, str]) -> str:
    """``{key="value",...}`` with the exposition format's escapes (a mount point may hold any
    character but NUL)."""
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return "{" + ",".join(f'{key}="{escape(value)}"' for key, value in labels.items()) + "}" if labels else ""


def histogram_lines(histogram: Histogram, name: str, labels: dict[str, str]) -> list[str]:
    """One histogram in the exposition format, its buckets cumulative as Prometheus wants."""
    base = dict(labels)
    tag = label_text(base)

    def bucket(bound: str) -> str:
        return label_text({**base, "le": bound})

    lines = [f"# TYPE {name} histogram"]
    lines += [f"{name}_bucket{bucket(str(b))} {count}" for b, count in zip(BUCKETS, histogram.counts, strict=True)]
    lines += [f"{name}_bucket{bucket('+Inf')} {histogram.total}", f"{name}_sum{tag} {histogram.sum:.6f}",
              f"{name}_count{tag} {histogram.total}"]
    return lines


def render(c: Stats, labels: dict[str, str] | None = None) -> str:
    """Every counter of one mount, each labelled with its mount point, reference and digest."""
    tag = label_text(labels or {})
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
        ("modelfs_cache_read_back_bytes_total", "counter", "Bytes of cached blocks read back from disk for readers",
         c.bytes_read_back),
        ("modelfs_cache_read_back_waits_total", "counter", "Reads that waited for a cached block read back from disk",
         c.read_back_waits),
        ("modelfs_inflight_blocks", "gauge", "Blocks being fetched now", c.inflight_blocks),
        ("modelfs_fetch_workers", "gauge", "Threads that receive, check and store blocks", c.workers),
    ]
    lines = []
    for name, kind, help_text, value in metrics:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{tag} {value}"]
    lines += histogram_lines(c.read_latency, "modelfs_read_latency_seconds", labels or {})
    return "\n".join(lines) + "\n"


HOST_METRICS = (  # from the status files: (metric, kind, help, status key)
    ("modelfs_mount_bytes_total", "gauge", "Bytes of the mounted model", "bytes_total"),
    ("modelfs_mount_bytes_local", "gauge", "Bytes of the mounted model held in the cache", "bytes_local"),
    ("modelfs_mount_offline", "gauge", "1 while the mount serves its cached copy with the registry unreachable",
     "offline"),
    ("modelfs_mount_answering", "gauge", "1 while the mount's daemon updates its status", "answering"),
    ("modelfs_mount_signatures_met", "gauge", "1 when the model's signatures met the policy, 0 when it is served "
     "without (signatures = warn) or a signed file's bytes differ from its signature; absent without a policy", "signatures_met"),
    ("modelfs_mount_metadata_ready_seconds", "gauge", "Seconds the mount took to fetch its metadata (configs, "
     "tokenizers, tensor headers) ahead; absent until ready", "metadata_seconds"),
    ("modelfs_reads_total", "counter", "FUSE read requests", "reads"),
    ("modelfs_read_errors_total", "counter", "FUSE reads answered with EIO", "read_errors"),
    ("modelfs_registry_bytes_total", "counter", "Bytes fetched from the registry", "bytes_fetched"),
    ("modelfs_integrity_errors_total", "counter", "Fetched blocks or blobs that did not match the index or digest",
     "integrity_errors"),
    ("modelfs_damaged_blocks_total", "counter", "Cached blocks that failed their checksum when read back",
     "damaged_blocks"),
    ("modelfs_handler_errors_total", "counter", "FUSE requests that met an unexpected error (answered EIO)",
     "handler_errors"),
)


def render_host(mounts: list[dict]) -> str:
    """Every mount of the host in one exposition, labelled per mount (``modelfs metrics``)."""
    lines = []
    for name, kind, help_text, key in HOST_METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for mount in mounts:
            value = mount.get(key)
            if key in ("offline", "answering"):
                value = int(bool(value))
            if value is None:
                continue
            labels = {"mountpoint": mount["mountpoint"], "reference": mount.get("reference", ""),
                      "digest": mount.get("digest", "")}
            lines.append(f"{name}{label_text(labels)} {value}")
    return "\n".join(lines) + "\n"


async def _answer(stream: trio.abc.Stream, render_body: Callable[[], str]) -> None:
    try:
        with trio.move_on_after(5):
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 8192:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                request += chunk
            body = render_body().encode()
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                                  b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    finally:
        await stream.aclose()


async def serve_metrics(address: str, render_body: Callable[[], str],
                        task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    host, _, port = address.rpartition(":")
    try:
        listeners = await trio.open_tcp_listeners(int(port), host=host.strip("[]") or "127.0.0.1")
    except (OSError, ValueError) as exc:
        raise ModelfsError(f"cannot serve metrics on {address}: {exc}") from None
    log.info("metrics on http://%s/metrics", address)
    task_status.started()
    async def answer(stream: trio.SocketStream) -> None:
        await _answer(stream, render_body)

    await trio.serve_listeners(answer, listeners)
