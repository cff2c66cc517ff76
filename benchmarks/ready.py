"""Time to ready: how long an inference server waits for its weights through modelfs, on a
link every connection shares, against the ideal and against pulling first.

    python -m benchmarks.ready [--size 2G] [--rate MB/s] [--loaders vllm,runai,odirect,gguf] [--skip-pull]

Builds a llama-like checkpoint (4 safetensors shards, index, config, 4 MB tokenizer; see
benchmarks/checkpoint.py), pushes it with modelfs to its own loopback registry, and puts an
nginx front to it behind a link of ``--rate`` MB/s for all connections together (a network
namespace and a tbf qdisc, benchmarks/link.py). The CLI and the mount daemons run inside the
namespace; the loaders (benchmarks/loaders.py: vLLM's, Run:ai Model Streamer's,
fastsafetensors', and llama.cpp's on a one-file GGUF of the same model) read plain paths on the
host, each in its own process, and check every byte.

Per loader, in one run: the loader on local files (page cache dropped), lazy (empty cache:
from the mount command's start to the loader's end), a fully cached mount (page cache
dropped), and pull-then-load (``modelfs pull``, then a mount of the cached model and the
load). The ideal is max(model bytes / the link's rate measured by curl, the loader on local
files). Needs root, ip, tc, nsenter, nginx, curl. Results: a table on stdout and JSON
(benchmarks/results/ready.json unless --json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import checkpoint, loaders
from benchmarks.harness import HERE, Bench, GiB, MiB, daemon_pid, drop_page_cache, free_port
from benchmarks.link import Counter, Front, Link

MODELFILE = """NAME llama-bench
ARCH transformer
FAMILY llama
FORMAT safetensors
CONFIG config.json generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json
CONFIG model.safetensors.index.json
MODEL *.safetensors
"""
GGUF_MODELFILE = "NAME gguf-bench\nARCH transformer\nFAMILY llama\nFORMAT gguf\nMODEL model.gguf\n"
TIMEOUT = 900  # seconds for any one command or load: a 2 GiB model at 200 MB/s takes 11


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([MG]?)i?B?", text.strip(), re.I)
    if not match:
        raise argparse.ArgumentTypeError(f"a size such as 256M or 2G, not {text!r}")
    return int(match.group(1)) * (GiB if match.group(2).upper() == "G" else MiB)


class Loader:
    """A loader process, started and its imports done before the clock starts."""

    def __init__(self, pattern: str, hashes: Path) -> None:
        self.pattern = pattern
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.loaders", pattern, str(hashes)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, cwd=HERE.parent)
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 60)
        if not ready or self.process.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError(f"the {pattern} loader did not start")

    def go(self, directory: Path) -> dict[str, float]:
        out, err = self.process.communicate(f"{directory}\n", timeout=TIMEOUT)
        if self.process.returncode != 0:
            raise AssertionError(f"the {self.pattern} loader failed on {directory}: {err.strip()}")
        return json.loads(out.strip().splitlines()[-1])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def kind(pattern: str) -> str:
    """Which checkpoint a loader reads: the one-file GGUF, or the sharded safetensors."""
    return "gguf" if pattern == "gguf" else "llama"


def read_bytes(pid: int) -> int:
    """Bytes the process (all its threads) read from storage: the daemon's cache read-back."""
    try:
        return int(re.search(r"^read_bytes: (\d+)$", Path(f"/proc/{pid}/io").read_text(), re.M).group(1))  # type: ignore[union-attr]
    except (OSError, AttributeError):
        return 0


class Run:
    """One run's parts: the registry and CLI (``Bench``), the link, its front and counter."""

    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work, self.args = work, args
        self.bench = Bench(work)
        self.link: Link | None = None
        self.front: Front | None = None
        self.counter: Counter | None = None
        self.daemons: list[tuple[int, str]] = []  # pid, mount point
        self.results: dict[str, object] = {}

    # -- set-up -------------------------------------------------------------------------------

    def prepare(self) -> None:
        """The checkpoints built and pushed (no link yet), each loader's expected hashes, the link."""
        llama = self.work / "model"
        llama.mkdir()
        self.models = {"llama": (llama, checkpoint.write(llama, self.args.size))}
        start = time.monotonic()
        host_ref = self.push("llama", llama, MODELFILE)
        self.results["push_s"] = time.monotonic() - start
        manifest = json.loads(self.bench.cli.run("inspect", "--plain-http", "--json", host_ref).stdout)["manifest"]
        self.largest = max(manifest["layers"], key=lambda layer: layer["size"])
        if "gguf" in self.args.loaders:
            gguf = self.work / "gguf"
            gguf.mkdir()
            self.models["gguf"] = (gguf, checkpoint.write_gguf(gguf / "model.gguf", self.args.size))
            self.push("gguf", gguf, GGUF_MODELFILE)
        self.hashes = {}
        for pattern in self.args.loaders:
            self.hashes[pattern] = self.work / f"expected-{pattern}.json"
            self.hashes[pattern].write_text(json.dumps(loaders.expected(pattern, self.models[kind(pattern)][0])))
        self.link = Link(self.args.rate)
        self.front = Front(self.work, f"{self.link.host_ip}:{free_port()}", self.bench.registry.address)
        self.counter = Counter(self.link)
        self.use("vllm")

    def push(self, repository: str, directory: Path, modelfile: str) -> str:
        """``modelfs build`` and ``push`` to the registry directly (the link is for reading)."""
        (self.work / f"{repository}.Modelfile").write_text(modelfile)
        host_ref = f"{self.bench.registry.address}/bench/{repository}:v1"
        self.bench.cli.run("build", "-t", host_ref, "-f", str(self.work / f"{repository}.Modelfile"), str(directory),
                           timeout=TIMEOUT)
        self.bench.cli.run("push", "--plain-http", host_ref, timeout=TIMEOUT)
        return host_ref

    def use(self, pattern: str) -> None:
        """The model ``pattern`` loads: its local copy, size, and reference through the link."""
        assert self.front is not None
        self.model, self.total = self.models[kind(pattern)]
        self.ref = f"{self.front.listen}/bench/{kind(pattern)}:v1"

    # -- inside the namespace ---------------------------------------------------------------------

    def inside(self, *command: str) -> subprocess.CompletedProcess:
        assert self.link is not None
        result = subprocess.run([*self.link.inside(), *command], env=self.bench.cli.env, capture_output=True, text=True,
                                timeout=TIMEOUT, cwd=HERE.parent)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(command[:4])} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def mount(self) -> tuple[Path, int, int]:
        self.bench.count += 1
        target = self.work / f"mnt{self.bench.count}"
        target.mkdir()
        port = free_port()
        out = self.inside(sys.executable, "-m", "modelfs", "mount", "--plain-http", "--metrics", f"127.0.0.1:{port}",
                          *self.args.mount_option, self.ref, str(target)).stdout
        self.bench.mounts.append(target)
        self.daemons.append((daemon_pid(out), str(target)))
        return target, self.daemons[-1][0], port

    def metrics(self, port: int) -> dict[str, float]:
        text = self.inside("curl", "-sf", f"http://127.0.0.1:{port}/metrics").stdout
        names = ("modelfs_registry_bytes_total", "modelfs_fetch_requests_total", "modelfs_fetch_retries_total",
                 "modelfs_served_bytes_total", "modelfs_cache_served_bytes_total", "modelfs_reads_total")
        found = {}
        for name in names:
            match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
            if match:
                found[name.removeprefix("modelfs_")] = float(match.group(1))
        return found

    # -- the cases ------------------------------------------------------------------------------

    def link_baseline(self) -> None:
        """curl of the largest blob through the link: its payload rate, and its wire rate at the counter."""
        assert self.counter is not None and self.front is not None
        url = f"http://{self.ref.split('/')[0]}/v2/bench/llama/blobs/{self.largest['digest']}"
        start = time.monotonic()
        out = self.inside("curl", "-sf", "-o", "/dev/null", "-w", "%{time_total} %{size_download}", url).stdout.split()
        end = time.monotonic()
        time.sleep(0.2)
        seconds, size = float(out[0]), int(out[1])
        if size != self.largest["size"]:
            raise AssertionError(f"curl got {size} bytes of a {self.largest['size']}-byte blob")
        window = self.counter.window(start, end)
        self.link_rate = size / seconds  # curl's own clock: without nsenter's and curl's start-up
        self.wire_rate = self.link_rate * window.bytes / size
        self.results["link"] = {"curl_bytes": size, "curl_s": seconds, "payload_Bps": self.link_rate,
                                "veth_Bps": self.wire_rate, "shaped_Bps": self.args.rate * 1e6}

    def local(self, pattern: str) -> float:
        drop_page_cache()
        with Loader(pattern, self.hashes[pattern]) as loader:
            result = loader.go(self.model)
        return result["end"] - result["start"]

    def lazy(self, pattern: str) -> dict[str, object]:
        """Empty cache, page cache dropped: the mount command's start to the loader's end."""
        assert self.counter is not None and self.front is not None
        self.bench.empty_cache()
        drop_page_cache()
        with Loader(pattern, self.hashes[pattern]) as loader:
            mark, start = self.front.mark(), time.monotonic()
            target, pid, port = self.mount()
            mounted, io_before = time.monotonic(), read_bytes(pid)
            result = loader.go(target)
        io_after, metrics = read_bytes(pid), self.metrics(port)
        time.sleep(0.2)
        window = self.counter.window(start, result["end"])
        after = self.counter.window(start, time.monotonic())
        requests = self.front.requests(mark)
        self.bench.umount(target)
        elapsed = result["end"] - start
        return {"s": elapsed, "mount_s": mounted - start, "first_tensor_s": result["first"] - start,
                "first_byte_s": window.first_byte, "last_byte_s": window.last_byte,
                "tail_s": elapsed - window.last_byte if window.last_byte is not None else None,
                "link_busy": window.busy_share(elapsed, self.wire_rate), "link_bytes": after.bytes,
                "read_back_per_byte": (io_after - io_before) / self.total,
                "amplification": requests["body_bytes"] / self.total, **requests, "metrics": metrics}

    def cached(self, pattern: str) -> dict[str, float]:
        """Every block cached, page cache dropped: the load alone, and the mount before it."""
        drop_page_cache()
        with Loader(pattern, self.hashes[pattern]) as loader:
            start = time.monotonic()
            target, pid, _ = self.mount()
            io_before = read_bytes(pid)
            result = loader.go(target)
        io_after = read_bytes(pid)
        self.bench.umount(target)
        return {"mount_s": result["start"] - start, "load_s": result["end"] - result["start"],
                "read_back_per_byte": (io_after - io_before) / self.total}

    def pull_then_load(self, pattern: str) -> dict[str, object]:
        """Empty cache, page cache dropped: ``modelfs pull``, then mount the cached model and load."""
        assert self.counter is not None and self.front is not None
        self.bench.empty_cache()
        drop_page_cache()
        with Loader(pattern, self.hashes[pattern]) as loader:
            mark, start = self.front.mark(), time.monotonic()
            self.inside(sys.executable, "-m", "modelfs", "pull", "--plain-http", self.ref)
            pulled = time.monotonic()
            requests = self.front.requests(mark)
            window = self.counter.window(start, pulled)
            target, _, _ = self.mount()
            result = loader.go(target)
        self.bench.umount(target)
        return {"s": result["end"] - start, "pull_s": pulled - start, "pull_Bps": self.total / (pulled - start),
                "pull_link_busy": window.busy_share(pulled - start, self.wire_rate),
                "pull_amplification": requests["body_bytes"] / self.total, "pull_requests": requests["requests"]}

    def loader_cases(self, pattern: str) -> dict[str, object]:
        self.use(pattern)
        local_s = self.local(pattern)
        lazy = self.lazy(pattern)
        cached = self.cached(pattern)
        row: dict[str, object] = {"model_bytes": self.total, "local_s": local_s, "ideal_s": max(self.total / self.link_rate, local_s), "lazy": lazy,
                                  "cached": cached, "local_MBps": self.total / local_s / 1e6,
                                  "cached_MBps": self.total / cached["load_s"] / 1e6}
        row["lazy_over_ideal"] = lazy["s"] / row["ideal_s"]  # type: ignore[operator]
        if not self.args.skip_pull:
            pull = self.pull_then_load(pattern)
            row["pull_then_load"] = pull
            row["pull_then_load_over_lazy"] = pull["s"] / lazy["s"]  # type: ignore[operator]
        return row

    def run(self) -> None:
        self.prepare()
        self.link_baseline()
        self.results["loaders"] = {pattern: self.loader_cases(pattern) for pattern in self.args.loaders}

    def close(self) -> None:
        for part in (self.counter, self.front):
            if part is not None:
                try:
                    part.close() if isinstance(part, Counter) else part.stop()
                except Exception as error:  # noqa: BLE001 -- tear down the rest whatever happens
                    print(f"tear-down: {error}", file=sys.stderr)
        for target in list(self.bench.mounts):  # interrupted: unmount as a user would, lazily if that fails
            try:
                self.bench.cli.run("umount", str(target), check=False, timeout=20)
            except subprocess.TimeoutExpired:
                pass
        self.bench.close()  # unmounts (lazily) what is still mounted, stops the registry
        for pid, target in self.daemons:
            end_daemon(pid, target)
        if self.link is not None:
            self.link.close()


def end_daemon(pid: int, target: str) -> None:
    """A daemon this run started that outlived its mount ends (one whose mount was detached lazily
    under a read was seen to outlive SIGTERM): SIGTERM after 5 s, SIGKILL 5 s later."""
    def alive() -> bool:
        try:
            return target.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()  # ours, not a reused pid
        except OSError:
            return False
    for signum in (None, signal.SIGTERM, signal.SIGKILL):
        if signum is not None and alive():
            print(f"tear-down: mount daemon {pid} still running, sending {signum.name}", file=sys.stderr)
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                return
        for _ in range(50):
            if not alive():
                return
            time.sleep(0.1)


def report(run: Run, args: argparse.Namespace, started: float, load: tuple[tuple[float, ...], tuple[float, ...]]) -> dict[str, object]:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    link = run.results["link"]
    assert isinstance(link, dict)
    rows = run.results["loaders"]
    assert isinstance(rows, dict)
    print(f"modelfs time to ready: {run.models['llama'][1] / GiB:.2f} GiB llama-like checkpoint (4 shards, index, config, "
          f"4 MB tokenizer){' and one GGUF of it' if 'gguf' in run.models else ''}, {time.monotonic() - started:.0f} s")
    print(f"{machine}; load average (1, 5, 15 min) {' '.join(f'{x:.2f}' for x in load[0])} at the start, "
          f"{' '.join(f'{x:.2f}' for x in load[1])} at the end")
    print(f"link: shaped to {args.rate} MB/s for all connections; curl of one {link['curl_bytes'] / 1e6:.0f} MB blob "
          f"through it: {link['payload_Bps'] / 1e6:.0f} MB/s ({link['veth_Bps'] / 1e6:.0f} MB/s counted at the veth, headers of 64 KiB packets)")
    print(f"build + push of the checkpoint (loopback, no link): {run.results['push_s']:.1f} s; mount options: {' '.join(args.mount_option) or 'defaults'}")
    print()
    print(f"{'loader':<8} {'local':>7} {'ideal':>7} {'lazy':>7} {'lazy/ideal':>10} {'pull+load':>9} {'p+l/lazy':>8} "
          f"{'1st tensor':>10} {'cached MB/s':>11} {'local MB/s':>10}")
    for pattern, row in rows.items():
        pull = row.get("pull_then_load")
        pull_s = f"{pull['s']:>8.2f}s" if pull else f"{'-':>9}"
        pull_ratio = f"{row['pull_then_load_over_lazy']:>7.2f}x" if pull else f"{'-':>8}"
        print(f"{pattern:<8} {row['local_s']:>6.2f}s {row['ideal_s']:>6.2f}s {row['lazy']['s']:>6.2f}s "
              f"{row['lazy_over_ideal']:>9.2f}x {pull_s} {pull_ratio} {row['lazy']['first_tensor_s']:>9.2f}s "
              f"{row['cached_MBps']:>11.0f} {row['local_MBps']:>10.0f}")
    print()
    print("where the lazy load's time went (seconds from the mount command's start):")
    print(f"{'loader':<8} {'mount':>6} {'1st byte':>8} {'link busy':>9} {'last byte':>9} {'tail':>6} {'read-back/B':>11} "
          f"{'amplif.':>7} {'requests':>8} {'ranges':>6}")
    for pattern, row in rows.items():
        lazy = row["lazy"]
        print(f"{pattern:<8} {lazy['mount_s']:>5.2f}s {fmt(lazy['first_byte_s'])} {lazy['link_busy'] * 100:>8.0f}% "
              f"{fmt(lazy['last_byte_s'], 9)} {fmt(lazy['tail_s'], 6)} {lazy['read_back_per_byte']:>11.3f} "
              f"{lazy['amplification']:>7.3f} {lazy['requests']:>8} {lazy['range_requests']:>6}")
    pulls = {pattern: row["pull_then_load"] for pattern, row in rows.items() if row.get("pull_then_load")}
    if pulls:
        print()
        for pattern, pull in pulls.items():
            print(f"modelfs pull (before {pattern}): {pull['pull_s']:.2f} s, {pull['pull_Bps'] / 1e6:.0f} MB/s = "
                  f"{pull['pull_Bps'] / link['payload_Bps']:.2f}x curl through the same link; link busy "
                  f"{pull['pull_link_busy'] * 100:.0f}%, amplification {pull['pull_amplification']:.3f}")
    problems = run.bench.daemon_problems()
    print(f"\ndaemon warnings and errors logged: {len(problems)}")
    for line in problems[:60]:
        print("   ", line[:300])
    return {"machine": machine, "load_average": load, "mount_options": args.mount_option, "size_bytes": run.models["llama"][1], "rate_MBps": args.rate,
            "results": run.results, "daemon_problems": problems}


def fmt(value: float | None, width: int = 8) -> str:
    return f"{value:>{width - 1}.2f}s" if value is not None else f"{'-':>{width}}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ready")
    parser.add_argument("--size", type=parse_size, default=2 * GiB, help="checkpoint size, e.g. 256M or 2G (default 2G)")
    parser.add_argument("--rate", type=int, default=200, help="the link's rate for all connections together, MB/s (default 200)")
    parser.add_argument("--loaders", default=",".join(loaders.PATTERNS), help=f"comma-separated, of {','.join(loaders.PATTERNS)} (default: all)")
    parser.add_argument("--skip-pull", action="store_true", help="skip pull-then-load")
    parser.add_argument("--mount-option", action="append", default=[], metavar="OPTION",
                        help="an option for every mount, for A/B (e.g. --mount-option=--prefetch=none); repeatable")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "ready.json", help="where to write the results")
    args = parser.parse_args(argv)
    args.loaders = [name.strip() for name in args.loaders.split(",") if name.strip()]
    unknown = set(args.loaders) - set(loaders.PATTERNS)
    if unknown or not args.loaders:
        parser.error(f"--loaders takes {','.join(loaders.PATTERNS)}")
    if os.geteuid() != 0:
        print("benchmarks.ready needs root (a network namespace, tc, dropping the page cache)", file=sys.stderr)
        return 2
    for tool in ("ip", "tc", "nsenter", "nginx", "curl"):
        if not shutil.which(tool):
            print(f"benchmarks.ready needs {tool}", file=sys.stderr)
            return 2
    # source, OCI store, registry and cache of each checkpoint, and a margin
    need = (2 if "gguf" in args.loaders else 1) * 4 * args.size * 12 // 10
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < need:
        print(f"benchmarks.ready needs about {need / GiB:.1f} GiB free in {tempfile.gettempdir()}, has {free / GiB:.1f}",
              file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="modelfs-ready-"))
    started, load_start = time.monotonic(), os.getloadavg()
    run = None
    try:
        run = Run(work, args)
        run.run()
        record = report(run, args, started, (load_start, os.getloadavg()))
    except BaseException:
        if run is not None:
            run.bench.show_daemon_logs()
        raise
    finally:
        if run is not None:
            run.close()
        shutil.rmtree(work, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
