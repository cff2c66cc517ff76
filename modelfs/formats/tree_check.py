"""One check of a model's whole file tree, over all its layers.

The mount builds its tree and ``extract`` writes its files only through :class:`TreeCheck`,
so both accept and refuse the same models, with the same words. A check of each layer alone
is not enough: a symlink chain may escape through links of two layers, and two layers may
name one path (as two files, or as a file and a directory). The check holds paths only, no
data, and is iterative throughout: a path 1,500 directories deep is legal (it fits in the
4096 bytes Linux allows) and is checked like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsafePathError
from .paths import clean_member_path, link_chain_escape, link_target_inside
from .spec import Descriptor

REGULAR, HARDLINK, SYMLINK, DIRECTORY = "file", "hardlink", "symlink", "dir"
_WORDS = {REGULAR: "a file", HARDLINK: "a file", SYMLINK: "a symlink", DIRECTORY: "a directory"}


def layer_label(number: int, layer: Descriptor) -> str:
    """How every message names a layer: its number, digest and file path (or media type)."""
    what = layer.filepath or layer.media_type
    if not what.isprintable():
        what = repr(what)  # a newline in an annotation must not split the one-line error
    return f"layer {number} ({layer.digest[:19]}, {what})"


def vet(name: str, kind: str, link: str, seen: set[str], where: str) -> tuple[str, str] | None:
    """Check one tar member alone, whatever reads the tar; returns (clean path, link).

    Refused: unsafe paths, symlinks that leave the tree by themselves, hard links to anything
    but an earlier member, duplicates. None for the archive's root directory entry. What
    needs the whole tree (conflicts across layers, link chains) is :class:`TreeCheck`'s.
    """
    member_where = f"{where}, member {name!r}"
    if kind == DIRECTORY and name.strip("/") in ("", "."):
        return None
    path = clean_member_path(name, member_where)
    if kind == SYMLINK and not link_target_inside(path, link):
        raise UnsafePathError(f"{member_where}: symlink to {link!r} leaves the model tree")
    if kind == HARDLINK:
        link = clean_member_path(link, member_where)
        if link not in seen:
            raise UnsafePathError(f"{member_where}: hard link to {link!r}, which is not an earlier member")
    if kind != DIRECTORY:
        if path in seen:
            raise UnsafePathError(f"{member_where}: duplicate path")
        seen.add(path)
    return path, link


@dataclass(frozen=True)
class _Entry:
    kind: str  # REGULAR (a hard link too), SYMLINK or DIRECTORY
    where: str  # the layer (and member) that put it there
    layer: str  # the layer alone: a hard link may only name a file of its own layer


class TreeCheck:
    """Every path of a model, added layer by layer in manifest order; refuses at once a path
    two layers (or two members) claim, a path through a file or a symlink, a hard link to
    anything but a regular file of its own layer, and at :meth:`finish` a symlink whose
    chain leaves the tree. Nothing may be served or written before :meth:`finish` returns."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._links: dict[str, str] = {}

    def add(self, path: str, kind: str, where: str, layer: str | None = None, link: str = "") -> None:
        """Add one clean path (``where`` names it in messages; ``layer`` defaults to it)."""
        layer = layer or where
        self._parents(path, where, layer)
        old = self._entries.get(path)
        if old is not None:
            if kind == DIRECTORY and old.kind == DIRECTORY:
                return
            raise self._conflict(path, kind, where, old)
        if kind == HARDLINK:
            self._check_hard_link(link, where, layer)
        elif kind == SYMLINK:
            if not link_target_inside(path, link):
                raise UnsafePathError(f"{where}: symlink {path!r} -> {link!r} leaves the model tree")
            self._links[path] = link
        self._entries[path] = _Entry(REGULAR if kind == HARDLINK else kind, where, layer)

    def _parents(self, path: str, where: str, layer: str) -> None:
        """Every directory above ``path`` is a directory (made implicitly if new), never a
        file or a link a later path would have to pass through. From the deepest up: the
        first known directory vouches for those above it."""
        missing: list[str] = []
        end = path.rfind("/")
        while end > 0:
            parent = path[:end]
            found = self._entries.get(parent)
            if found is not None:
                if found.kind != DIRECTORY:
                    raise self._conflict(parent, DIRECTORY, where, found)
                break
            missing.append(parent)
            end = path.rfind("/", 0, end)
        for parent in missing:
            self._entries[parent] = _Entry(DIRECTORY, where, layer)

    @staticmethod
    def _conflict(path: str, kind: str, where: str, old: _Entry) -> UnsafePathError:
        if DIRECTORY not in (kind, old.kind):
            return UnsafePathError(f"{where}: duplicate path {path!r} (also in {old.where})")
        other = old.kind if kind == DIRECTORY else kind
        return UnsafePathError(f"{where}: {path!r} is both {_WORDS[other]} and a directory "
                               f"({_WORDS[old.kind]} in {old.where})")

    def _check_hard_link(self, link: str, where: str, layer: str) -> None:
        target = self._entries.get(link)
        if target is None or target.kind != REGULAR or target.layer != layer:
            raise UnsafePathError(f"{where}: hard link to {link!r}, which is not a regular file of this layer "
                                  "(a link, a directory, missing or in another layer); refusing it")

    def kind(self, path: str) -> str | None:
        """What ``path`` is in the tree so far (a hard link counts as the file it copies)."""
        entry = self._entries.get(path)
        return entry.kind if entry else None

    def where(self, path: str) -> str:
        return self._entries[path].where

    def kinds(self) -> dict[str, str]:
        """Every path of the tree so far and what it is (what a view cuts: :mod:`.view`)."""
        return {path: entry.kind for path, entry in self._entries.items()}

    def symlinks(self) -> dict[str, str]:
        """The model's symlinks, path -> target."""
        return dict(self._links)

    def children(self) -> dict[str, list[str]]:
        """Each directory's entries by name ("" is the root), for walking the tree without recursion."""
        out: dict[str, list[str]] = {"": []}
        for path, entry in self._entries.items():
            parent, _, name = path.rpartition("/")
            out.setdefault(parent, []).append(name)
            if entry.kind == DIRECTORY:
                out.setdefault(path, [])
        return out

    def finish(self) -> None:
        """Refuse any symlink that leaves the tree once whole chains are followed, across
        layers (a link through another link's ``..``); each alone was checked when added."""
        for path, link in self._links.items():
            escape = link_chain_escape(path, self._links)
            if escape is None:
                continue
            via, looped = escape
            through = "; ".join(f"{hop!r} -> {self._links[hop]!r} in {self._entries[hop].layer}" for hop in via)
            what = "loops" if looped else "leaves the model tree"
            raise UnsafePathError(f"{self._entries[path].where}: symlink {path!r} -> {link!r} {what} once the links "
                                  f"it goes through are followed ({through or 'no other link'})")
