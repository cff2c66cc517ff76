"""A slow link shared by every connection: a network namespace joined to the host by a veth
pair, the host side's egress (registry -> clients, the download direction) shaped by one tbf
qdisc, so all connections together get the rate (nginx's ``limit_rate`` is per connection: 16
range requests in flight would get 16 times the link). An nginx front on the host end of the
veth proxies to the loopback registry and logs every request (bytes sent, Range header).

Clients run inside the namespace with ``nsenter --net=`` (not ``ip netns exec``, which also
unshares the mount namespace and would hide a FUSE mount from the host). :class:`Counter`
samples the host veth's tx byte counter every 50 ms: what crossed the link, and when.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import answers

SAMPLE_S = 0.05
QUIET_BYTES = 4096  # growth per sample below this is not data (neighbour discovery, a stray ack)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Link:
    """The namespace, the veth pair and the shaper; :meth:`close` removes all three."""

    def __init__(self, rate_mbps: int) -> None:
        tag = f"{os.getpid() % 100000}"
        self.namespace, self.host_if, self.peer_if = f"mfsbench{tag}", f"mfsh{tag}", f"mfsn{tag}"
        subnet = 100 + os.getpid() % 100
        self.host_ip, self.peer_ip = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
        self.rate_mbps = rate_mbps
        try:
            _ip("netns", "add", self.namespace)
            _ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
            _ip("link", "set", self.peer_if, "netns", self.namespace)
            _ip("addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
            _ip("link", "set", self.host_if, "up")
            _ip("-n", self.namespace, "addr", "add", f"{self.peer_ip}/24", "dev", self.peer_if)
            _ip("-n", self.namespace, "link", "set", self.peer_if, "up")
            _ip("-n", self.namespace, "link", "set", "lo", "up")
            # burst: 2 MB, 10 ms at 200 MB/s, above a 64 KiB GSO packet; latency bounds the queue
            subprocess.run(["tc", "qdisc", "add", "dev", self.host_if, "root", "tbf", "rate", f"{rate_mbps * 8}mbit",
                            "burst", "2000000", "latency", "50ms"], check=True, capture_output=True, timeout=30)
        except BaseException:
            self.close()
            raise

    def inside(self) -> list[str]:
        """The prefix that runs a command in the namespace, with the host's mounts."""
        return ["nsenter", f"--net=/run/netns/{self.namespace}"]

    def tx_bytes(self) -> int:
        return int(Path(f"/sys/class/net/{self.host_if}/statistics/tx_bytes").read_text())

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=30)


@dataclass
class Window:
    """What crossed the link between two moments (monotonic seconds)."""

    start: float
    bytes: int
    first_byte: float | None  # seconds after start of the first growth (the sample before it)
    last_byte: float | None   # seconds after start of the last growth (the sample after it, at most end)

    def busy_share(self, elapsed: float, wire_rate: float) -> float:
        """The share of ``elapsed`` the link needed at its full rate for what it carried."""
        return self.bytes / wire_rate / elapsed if elapsed > 0 else 0.0


class Counter:
    """Samples the link's tx counter every 50 ms on a thread, for the whole run."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="link-counter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.link.tx_bytes()))
            except OSError:
                return
            self._stop.wait(SAMPLE_S)

    def now(self) -> int:
        return self.link.tx_bytes()

    def window(self, start: float, end: float) -> Window:
        """Bytes from the last sample at or before ``start`` to the first at or after ``end``;
        the first and last growths between them."""
        samples = list(self.samples)
        before = [s for s in samples if s[0] <= start] or samples[:1]
        inside = [s for s in samples if start < s[0] <= end]
        after = [s for s in samples if s[0] > end][:1]
        series = before[-1:] + inside + after
        first = last = None
        for (before_moment, previous), (moment, count) in zip(series, series[1:], strict=False):
            if count - previous > QUIET_BYTES:  # it grew in (before_moment, moment]: to 50 ms
                first = max(before_moment, start) - start if first is None else first
                last = min(moment, end) - start
        return Window(start, series[-1][1] - series[0][1], first, last)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class Front:
    """nginx on the host end of the link, proxying to the registry and logging each request."""

    def __init__(self, work: Path, listen: str, upstream: str) -> None:
        self.listen = listen
        self.log = work / "front-access.log"
        temp = work / "front-temp"
        temp.mkdir()
        conf = work / "front.conf"
        conf.write_text(f"""
worker_processes 1; daemon off; pid {work}/front.pid; error_log {work}/front.err warn;
events {{ worker_connections 1024; }}
http {{
  log_format bench '$msec $request_method $status $body_bytes_sent "$http_range" $request_uri';
  access_log {self.log} bench;
  client_body_temp_path {temp}; proxy_temp_path {temp}; fastcgi_temp_path {temp};
  uwsgi_temp_path {temp}; scgi_temp_path {temp};
  server {{
    listen {listen};
    client_max_body_size 0;
    location / {{
      proxy_pass http://{upstream}; proxy_set_header Host $http_host; proxy_http_version 1.1;
      proxy_buffering on; proxy_max_temp_file_size 0; proxy_buffers 8 1m; proxy_buffer_size 64k;
    }}
  }}
}}""")
        self.process = subprocess.Popen(["nginx", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if answers(f"http://{listen}/v2/"):
            return
        self.stop()
        raise RuntimeError(f"nginx did not start: {(work / 'front.err').read_text(errors='replace')}")

    def mark(self) -> int:
        """Where the log ends now: :meth:`requests` since this mark."""
        return self.log.stat().st_size

    def requests(self, mark: int) -> dict[str, int]:
        """GETs, range requests and body bytes sent since ``mark``."""
        with open(self.log, "rb") as handle:
            handle.seek(mark)
            lines = handle.read().decode(errors="replace").splitlines()
        counts = {"requests": 0, "range_requests": 0, "blob_gets": 0, "body_bytes": 0}
        for line in lines:
            fields = line.split(" ", 4)
            if len(fields) < 5:
                continue
            counts["requests"] += 1
            counts["body_bytes"] += int(fields[3])
            ranged, uri = fields[4].rsplit(" ", 1)
            counts["range_requests"] += ranged != '"-"'
            counts["blob_gets"] += fields[1] == "GET" and "/blobs/" in uri
        return counts

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
