"""Comparing a model tree served or written by modelfs with its source, byte for byte."""

from __future__ import annotations

from pathlib import Path


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def assert_same_tree(got: Path, source: Path) -> None:
    """The same file names, and every file's bytes equal to the source's."""
    assert files(got) == files(source)
    for name in files(source):
        assert (got / name).read_bytes() == (source / name).read_bytes(), name
