"""A selective view of a model: the files ``--include`` and ``--exclude`` keep.

One decision, made here and nowhere else, for every command (``mount``, ``pull``,
``extract``, a CSI volume): :meth:`View.keeps` says whether one path is in the view, and
:meth:`View.select` cuts a whole checked tree (:class:`~modelfs.formats.tree_check.TreeCheck`,
which has already seen every layer: safety never depends on the view).

The patterns are gitignore lines (:mod:`.gitignore`, matched in polynomial time), strictly
last-match-wins (git's own exception, a file pattern outranking a directory's, would let
``!tokenizer/vocab.txt`` before ``tokenizer/`` keep the file): ``*`` does
not cross ``/``, ``**`` does, a trailing ``/`` matches a directory and everything under it, a
pattern without ``/`` matches the name at any depth, a leading ``/`` anchors it to the root,
``!`` takes a match back, and the last pattern that matches decides. How they combine
(doc/CONFIGURATION.md, "Selective views"):

- no ``--include``: the view starts with every file; else with the files the ``--include``
  lines match (``!P`` among them takes P's files back out);
- then the files the ``--exclude`` lines match leave it (``!P`` among them keeps P's files in).

A split GGUF (``NAME-00001-of-00003.gguf``, llama.cpp's ``gguf-split`` naming) is one model
file in pieces: a pattern that names its first split, or the unsplit ``NAME.gguf``, decides
for every split of it. Symlinks are kept or dropped by their own path, like files; a kept
link whose target is outside the view dangles. A directory is in the view only if something
in the view is under it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import InvalidPattern
from .gitignore import MAX_PATTERNS, Line, Lines, compile_line
from .tree_check import DIRECTORY

# llama.cpp's gguf-split names its pieces NAME-00001-of-00003.gguf (five digits each)
_SPLIT = re.compile(r"(?P<stem>.+)-(?P<part>[0-9]{5})-of-(?P<count>[0-9]{5})\.gguf")


def _compile(patterns: Sequence[str], where: str) -> tuple[Line, ...]:
    """The compiled lines of ``patterns``, each refused in one line if it is no gitignore line
    or matches nothing (a blank line, a comment); at most MAX_PATTERNS of them."""
    if len(patterns) > MAX_PATTERNS:
        raise InvalidPattern(f"{where}: {len(patterns):,} patterns; at most {MAX_PATTERNS:,} are taken")
    return tuple(compile_line(pattern, where) for pattern in patterns)


def check_patterns(patterns: Sequence[str], where: str) -> None:
    """Refuse, in one line, a pattern that is no gitignore line or one that matches nothing,
    and more than MAX_PATTERNS of them: the check every surface (flag, fstab, config, CSI) makes."""
    _compile(patterns, where)


def _names(path: str) -> tuple[str, ...]:
    """The names a path is matched as: itself, and for a split GGUF its first split and its
    unsplit name too."""
    split = _SPLIT.fullmatch(path)
    if split is None:
        return (path,)
    stem = split.group("stem")
    return (path, f"{stem}-00001-of-{split.group('count')}.gguf", f"{stem}.gguf")


def _matches(lines: Lines, names: Iterable[str]) -> bool:
    """Whether the last line that matches any name of one file is a positive one."""
    last = max(lines.last_match(name) for name in names)
    return last >= 0 and not lines.lines[last].negated


@dataclass(frozen=True)
class View:
    """The ``--include`` and ``--exclude`` patterns of one command, checked when made."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    # a view this one only narrows (the node's, under a CSI pod's: doc/KUBERNETES.md): a path
    # is kept only if both keep it, whatever either's patterns say
    within: View | None = None
    _included: Lines = field(default=Lines(()), init=False, repr=False, compare=False)
    _excluded: Lines = field(default=Lines(()), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_included", Lines(_compile(self.include, "--include")))
        object.__setattr__(self, "_excluded", Lines(_compile(self.exclude, "--exclude")))

    @classmethod
    def of(cls, include: Sequence[str] | None, exclude: Sequence[str] | None, within: View | None = None) -> View:
        return cls(tuple(include or ()), tuple(exclude or ()), within)  # as given: a trailing '\\ ' is part of a name

    @property
    def everything(self) -> bool:
        """No pattern: the whole model, its empty directories included."""
        return not self.include and not self.exclude and (self.within is None or self.within.everything)

    def keeps(self, path: str) -> bool:
        """Whether the file or symlink at ``path`` (clean, relative) is in the view."""
        if self.everything:
            return True
        if self.within is not None and not self.within.keeps(path):
            return False
        names = _names(path)
        if self.include and not _matches(self._included, names):
            return False
        return not _matches(self._excluded, names)

    def select(self, kinds: Mapping[str, str]) -> set[str] | None:
        """Every path of a checked tree (path -> kind) that is in the view: the files and links
        :meth:`keeps` keeps, and the directories above them. None: the whole tree. A view
        that keeps nothing is refused."""
        if self.everything:
            return None
        kept: set[str] = set()
        for path, kind in kinds.items():
            if kind == DIRECTORY or not self.keeps(path):
                continue
            kept.add(path)
            end = path.rfind("/")
            while end > 0 and path[:end] not in kept:
                kept.add(path[:end])
                end = path.rfind("/", 0, end)
        if not kept:  # a typo, or a quantization this model lacks: say so rather than serve nothing
            raise InvalidPattern("--include / --exclude: no file of the model is in the view (see its files with "
                                 "`modelfs inspect`)")
        return kept
