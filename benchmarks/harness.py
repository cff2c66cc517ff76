"""What every benchmark case shares: its own registry and isolated CLI (:class:`Bench`),
timing, dropping the page cache, a weight-like safetensors file, a daemon's peak RSS."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import SAMPLE_MODELFILE, Cli, Registry, daemon_pid, free_port  # noqa: E402

__all__ = ["GiB", "HERE", "answers", "SAMPLE_MODELFILE", "Bench", "Cli", "MiB", "Registry", "drop_page_cache", "free_port", "peak_rss",
           "read_file", "timed", "write_safetensors"]

MiB = 1 << 20
GiB = 1 << 30


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def answers(url: str, tries: int = 100) -> bool:
    """Whether ``url`` answers within ``tries`` looks 50 ms apart (a front just started)."""
    for _ in range(tries):
        try:
            httpx.get(url, timeout=1)
            return True
        except httpx.HTTPError:
            time.sleep(0.05)
    return False


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def read_file(path: Path) -> None:
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(4 * MiB)
        while handle.readinto(buffer):
            pass


def write_safetensors(path: Path, total: int, tensors: int = 64) -> None:
    """A real safetensors layout: 8-byte header length, JSON header, then the tensors."""
    each = total // tensors
    header = {f"layer.{i}.weight": {"dtype": "F32", "shape": [each // 4], "data_offsets": [i * each, (i + 1) * each]}
              for i in range(tensors)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for _ in range(tensors):
            out.write(os.urandom(each))


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.registry = Registry(work / "registry")
        self.cli = Cli(work / "home")
        self.mounts: list[Path] = []
        self.results: dict[str, dict] = {}
        self.count = 0

    def mount(self, ref: str, *extra: str) -> tuple[Path, int, str]:
        self.count += 1
        target = self.work / f"mnt{self.count}"
        target.mkdir()
        port = free_port()
        out = self.cli.run("mount", "--plain-http", *extra, "--metrics", f"127.0.0.1:{port}", ref, str(target)).stdout
        self.mounts.append(target)
        return target, daemon_pid(out), f"http://127.0.0.1:{port}/metrics"

    def umount(self, target: Path) -> None:
        self.cli.run("umount", str(target))
        self.mounts.remove(target)

    def empty_cache(self) -> None:
        """Make the next mount cold: no cached block of any blob."""
        shutil.rmtree(self.cli.cache_dir / "blobs", ignore_errors=True)

    @staticmethod
    def metric(url: str, name: str) -> float:
        """A metric's value (its labels, the mount's, ignored)."""
        return float(re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", httpx.get(url).text, re.M).group(1))

    def record(self, case: str, modelfs_s: float, baseline_s: float, baseline: str, target: str, **extra) -> None:
        self.results[case] = {"modelfs_s": modelfs_s, "baseline_s": baseline_s, "baseline": baseline,
                              "ratio": baseline_s / modelfs_s, "target": target, **extra}

    def show_daemon_logs(self, lines: int = 40) -> None:
        """A case failed: what the mount daemons said, before the work directory goes."""
        for log in sorted((self.cli.cache_dir / "logs").glob("*.log")):
            print(f"--- {log.name}", *log.read_text(errors="replace").splitlines()[-lines:], sep="\n", file=sys.stderr)

    def daemon_problems(self) -> list[str]:
        """Warnings and errors the mount daemons logged during the run (a clean run has none)."""
        found: list[str] = []
        for log in sorted((self.cli.cache_dir / "logs").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()
            for number, line in enumerate(lines):
                if " WARNING " in line or " ERROR " in line:
                    found.append(line)
                    if " ERROR " in line:  # and its traceback, if one follows: the case for a bug report
                        for after in lines[number + 1:number + 40]:
                            if after[:4].isdigit():
                                break
                            found.append(after)
        return found

    def close(self) -> None:
        for target in list(self.mounts):
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
        self.registry.stop()


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024
