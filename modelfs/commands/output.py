"""What commands print besides their result: a progress bar, and labels in one column."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal, else a final line)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done, self.already = total, label, 0, 0
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()

    def __call__(self, amount: int) -> None:
        """``amount`` more bytes moved over the network."""
        self.done += amount
        self._draw()

    def skip(self, amount: int) -> None:
        """``amount`` bytes that were already there (cached, or present at the registry)."""
        self.already += amount
        self.done += amount
        self._draw()

    def _draw(self) -> None:
        if self.tty:
            fraction = min(1.0, self.done / self.total if self.total else 1.0)
            bar = "#" * int(fraction * 30)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {fraction:6.1%} {self.done / 1e6:,.0f}/{self.total / 1e6:,.0f} MB")
            sys.stderr.flush()

    def finish(self) -> None:
        """A last line with the rate of what moved: bytes that were already there took no time."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        end = "\n" if self.tty else ""
        moved = max(0, self.done - self.already)
        if not moved:
            line = f"{self.label}: all {self.total / 1e6:,.1f} MB already there"
        else:
            line = f"{self.label}: {moved / 1e6:,.1f} MB in {elapsed:.1f}s ({moved / 1e6 / elapsed:,.0f} MB/s)"
            if self.already:
                line += f", {self.already / 1e6:,.1f} MB already there"
        sys.stderr.write(f"{end}{line}\n")


def label_column(rows: list[tuple[str, str]]) -> list[str]:
    """``Label:  value`` lines, the values in one column two spaces past the widest label, so
    no label touches its value whatever the labels (a fixed width printed
    ``Architecture:transformer``)."""
    width = max((len(label) for label, _ in rows), default=0) + len(":  ")
    return [f"{label + ':':<{width}}{value}" for label, value in rows]
