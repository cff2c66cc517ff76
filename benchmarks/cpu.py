"""CPU seconds spent by a process, all its threads and children together, and by one thread
alone: the data plane's budget is per GiB delivered, for the whole daemon and for the thread
that answers FUSE (the one a mount's throughput cannot spread past)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _stat_cpu(path: Path) -> float:
    """utime + stime of a /proc stat file, in seconds (fields 14 and 15)."""
    fields = path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (worker processes count against the daemon)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            children = task / "children"
            if children.exists():
                todo += [int(c) for c in children.read_text().split()]
    return found


@dataclass
class CpuSample:
    total: float  # every thread of every process in the tree
    serving: float  # the daemon's main thread: the one that answers FUSE

    def __sub__(self, other: CpuSample) -> CpuSample:
        return CpuSample(self.total - other.total, self.serving - other.serving)


def sample(pid: int) -> CpuSample:
    total = 0.0
    for member in process_tree(pid):
        try:
            total += _stat_cpu(Path(f"/proc/{member}/stat"))
        except (FileNotFoundError, ProcessLookupError):
            pass
    return CpuSample(total, _stat_cpu(Path(f"/proc/{pid}/task/{pid}/stat")))


def workers(spent: CpuSample) -> float:
    """CPU seconds of every thread but the serving one: workers receiving, checking and
    storing, and read-back threads serving cached blocks (beside the serving thread's line)."""
    return spent.total - spent.serving


def threads(pid: int) -> dict[str, float]:
    """CPU seconds per thread name, for the profile in doc/BENCHMARKS.md."""
    by_name: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        name = (task / "comm").read_text().strip()
        by_name[name] = by_name.get(name, 0.0) + _stat_cpu(task / "stat")
    return by_name
