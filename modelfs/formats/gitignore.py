"""One gitignore line, compiled and matched against a model's paths in polynomial time.

Why not one regex per line (what the ``pathspec`` library does): a glob turned into a regular
expression (``*`` -> ``[^/]*``) backtracks exponentially in Python's ``re`` --
``*a*a*a*a*a*a*a*a*a*a*b`` against a 60-character name did not finish in a minute, and an
operator's ``*a*a*a*a*a*a*a*a*.gguf`` against a publisher's 240-character name hung the mount
before it served, a pull or an extract with it. Here a line is split at ``/`` into segments,
a segment at its stars into star-free pieces found left to right (:class:`_Glob`), and a path
walked part by part with the set of segments consumed so far (``**`` may consume many), that
state kept per directory (:class:`Lines`): a file costs one step per line whatever its depth.
800 ``**`` segments against 1,000 files 2,000 directories deep take 0.7 s (a regex: 0.3 s a
file, and more as the pattern grows), and 200,000 ordinary paths against three lines 0.5-0.6 s
(pathspec: 0.3 s, unbounded on hostile input).

What a line means is git's (gitignore(5)), checked against a file's path, clean and relative:
``#`` starts a comment, ``!`` takes a match back, ``\\`` escapes the next character (``\\!``,
``\\#``, a trailing ``\\ ``), unescaped trailing spaces are dropped (leading ones too: in a flag
they are a slip, never a name), ``*`` ``?`` ``[...]`` never match ``/``, ``**`` as a whole
segment matches any number of directories, a trailing ``/`` matches only a directory (so every
file under it), a line with a ``/`` before its end is anchored at the root, one without matches
at any depth, and a line that matches a directory matches every file under it (``a/*`` takes
``a/b/c``, as git ignores it; ``**/`` matches no file at the root). Matching is
case-sensitive and compares names as they are (no Unicode normalization), like git on Linux.
POSIX classes (``[[:alpha:]]``) are refused rather than half-supported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from ..errors import InvalidPattern
from .paths import MAX_PATH_BYTES

MAX_PATTERNS = 256  # per --include or --exclude list: a view names a few files; 256 cost ~0.25 ms a path



class _Wild(Enum):
    STAR = "*"  # any run of characters but '/'
    ANY = "?"  # one character but '/'


@dataclass(frozen=True)
class _Class:
    """``[...]``: one character but '/' in (or, negated, not in) the ranges."""

    negated: bool
    ranges: tuple[tuple[str, str], ...]


Token = str | _Wild | _Class  # a str is one literal character


@dataclass(frozen=True)
class Line:
    """One compiled gitignore line."""

    text: str  # as given, for messages
    negated: bool
    directory_only: bool  # the line ended in '/' (or '/**'): it matches what is under a directory
    segments: tuple[_Glob | None, ...]  # None: a '**' segment, any number of directories

    def start(self) -> State:
        """The state before any part of a path: no part consumed, no directory matched."""
        return self._closure({0}), False

    def step(self, state: State, part: str, last: bool) -> State:
        """The state after one more part of the path (``last``: the file's own name). The
        states are the segments consumed so far (a '**' segment may consume any number of
        parts); a line that matched a directory matches everything under it."""
        positions, matched = state
        if matched or not positions:
            return state
        segments, final = self.segments, len(self.segments)
        after: set[int] = set()
        for i in positions:
            if i == final:
                continue
            segment = segments[i]
            if segment is None:
                after.add(i)  # '**' takes this part too
            elif segment.matches(part):
                after.add(i + 1)
        closed = self._closure(after)
        return closed, final in closed and (not last or not self.directory_only)

    def _closure(self, positions: set[int]) -> frozenset[int]:
        """``positions`` and those a '**' segment reaches by taking no part."""
        found = set(positions)
        for i in sorted(positions):
            while i < len(self.segments) and self.segments[i] is None and i + 1 not in found:
                found.add(i + 1)
                i += 1
        return frozenset(found)

    def matches(self, parts: list[str]) -> bool:
        """Whether this line matches the file whose path is ``parts`` (or a directory above it)."""
        state = self.start()
        for n, part in enumerate(parts):
            state = self.step(state, part, n == len(parts) - 1)
        return state[1]


State = tuple[frozenset[int], bool]  # (segments consumed, matched): a line's progress along a path


class Lines:
    """Lines matched against many paths of one tree: the state after each directory is kept
    (a file costs one step per line, not one per part of its path), bounded in number."""

    MAX_DIRECTORIES = 1 << 16

    def __init__(self, lines: tuple[Line, ...]) -> None:
        self.lines = lines
        self._root = tuple(line.start() for line in lines)
        self._directories: dict[str, tuple[State, ...]] = {}

    def last_match(self, path: str) -> int:
        """The index of the last line that matches the file at ``path``, or -1."""
        if not self.lines:
            return -1
        directory, _, name = path.rpartition("/")
        states = self._directory(directory)
        for index in range(len(self.lines) - 1, -1, -1):
            if self.lines[index].step(states[index], name, True)[1]:
                return index
        return -1

    def _directory(self, directory: str) -> tuple[State, ...]:
        """The lines' states after the parts of ``directory`` (a loop from the deepest known)."""
        if not directory:
            return self._root
        found = self._directories.get(directory)
        if found is not None:
            return found
        ends = [n for n, char in enumerate(directory) if char == "/"] + [len(directory)]
        known = len(ends)
        while known > 0 and directory[:ends[known - 1]] not in self._directories:
            known -= 1
        states = self._directories[directory[:ends[known - 1]]] if known else self._root
        if len(self._directories) > self.MAX_DIRECTORIES:
            self._directories.clear()
        for n in range(known, len(ends)):
            part = directory[ends[n - 1] + 1 if n else 0:ends[n]]
            states = tuple(line.step(state, part, False) for line, state in zip(self.lines, states, strict=True))
            self._directories[directory[:ends[n]]] = states
        return states


def compile_line(pattern: str, where: str) -> Line:
    """A gitignore line compiled, or InvalidPattern in one line saying why it is none."""
    if len(pattern.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise InvalidPattern(f"{where}: a pattern of {len(pattern):,} characters is longer than any path of a model "
                             f"({MAX_PATH_BYTES} bytes)")
    if "\0" in pattern:
        raise InvalidPattern(f"{where}: {pattern!r} holds a NUL byte, which no path of a model does")
    text = trim(pattern)
    if not text or text.startswith("#"):
        raise InvalidPattern(f"{where}: {pattern!r} matches nothing (blank, or a # comment); give a gitignore "
                             "pattern like '*.gguf' or 'tokenizer/'")
    negated = text.startswith("!")
    body = text[1:] if negated else text
    if not body:
        raise InvalidPattern(f"{where}: {pattern!r} is not a gitignore pattern ('!' takes back a pattern: '!*.md'; "
                             "a name starting with '!' is written '\\!')")
    directory_only = body.endswith("/") and not body.endswith("\\/")
    body = body[:-1] if directory_only else body  # one: 'a//' has an empty part, refused below
    anchored = "/" in body
    raw = body[1:].split("/") if body.startswith("/") else body.split("/")
    segments: list[_Glob | None] = [] if anchored else [None]
    for part in raw:
        if part in (".", "..") or not part:
            raise InvalidPattern(f"{where}: {pattern!r} is not a gitignore pattern for a model's paths (they are "
                                 "clean and relative: no empty, '.' or '..' part)")
        segments.append(None if set(part) == {"*"} and len(part) > 1 else _Glob(_tokens(part, pattern, where)))
    if len(segments) > 1 and segments[-1] is None and segments[-2] is not None:  # 'a/**': everything under a, as 'a/'
        segments.pop()
        directory_only = True
    return Line(pattern, negated, directory_only, tuple(segments))


def trim(pattern: str) -> str:
    """Leading whitespace and unescaped trailing whitespace dropped (``a\\ `` keeps its space)."""
    text = pattern.lstrip()
    end = len(text)
    while end and text[end - 1].isspace():
        backslashes = len(text[:end - 1]) - len(text[:end - 1].rstrip("\\"))
        if backslashes % 2:
            break
        end -= 1
    return text[:end]


def _tokens(part: str, pattern: str, where: str) -> tuple[Token, ...]:
    """One segment's tokens: literals, ``?``, ``*`` (runs collapsed) and ``[...]`` classes."""
    tokens: list[Token] = []
    i = 0
    while i < len(part):
        char = part[i]
        if char == "\\":
            if i + 1 == len(part):
                raise InvalidPattern(f"{where}: {pattern!r} is not a gitignore pattern (it ends in a lone '\\')")
            tokens.append(part[i + 1])
            i += 2
        elif char == "*":
            if not tokens or tokens[-1] is not _Wild.STAR:
                tokens.append(_Wild.STAR)
            i += 1
        elif char == "?":
            tokens.append(_Wild.ANY)
            i += 1
        elif char == "[":
            parsed = _char_class(part, i, pattern, where)
            if parsed is None:  # no closing ']': a literal '[' (as git and pathspec read it)
                tokens.append("[")
                i += 1
            else:
                tokens.append(parsed[0])
                i = parsed[1]
        else:
            tokens.append(char)
            i += 1
    return tuple(tokens)


def _char_class(part: str, start: int, pattern: str, where: str) -> tuple[_Class, int] | None:
    """The class at ``part[start] == '['``: (negated, ranges) and the index after it, or None."""
    i = start + 1
    negated = i < len(part) and part[i] in "!^"
    i += negated
    ranges: list[tuple[str, str]] = []
    first = True
    while i < len(part):
        char = part[i]
        if char == "]" and not first:
            return _Class(negated, tuple(ranges)), i + 1
        if char == "[" and part.startswith("[:", i):
            raise InvalidPattern(f"{where}: {pattern!r}: POSIX character classes ('[[:alpha:]]') are not supported; "
                                 "give the characters ('[a-zA-Z]')")
        if char == "\\" and i + 1 < len(part):
            i += 1
            char = part[i]
        if i + 2 < len(part) and part[i + 1] == "-" and part[i + 2] != "]":
            high = part[i + 3] if part[i + 2] == "\\" and i + 3 < len(part) else part[i + 2]
            ranges.append((char, high))
            i += 4 if part[i + 2] == "\\" else 3
        else:
            ranges.append((char, char))
            i += 1
        first = False
    return None


class _Glob:
    """One segment's glob, cut at its stars into star-free pieces, each a fixed-length regex
    (literals, ``?``, classes: nothing to backtrack over). The first piece must match at the
    start, the last at the end, and each one between at its leftmost place after the one
    before: for stars that match any run, the leftmost place is never wrong, so the walk is
    at most len(pieces) searches -- in C, 200,000 paths in about a second."""

    def __init__(self, tokens: tuple[Token, ...]) -> None:
        # a plain name ('docs', 'config.json'): compared as a string, no regex compiled
        plain = [token for token in tokens if isinstance(token, str)]
        self.literal = "".join(plain) if len(plain) == len(tokens) else None
        pieces: list[list[Token]] = [[]]
        for token in tokens:
            if token is _Wild.STAR:
                pieces.append([])
            else:
                pieces[-1].append(token)
        self.starred = len(pieces) > 1
        self.lengths = [len(piece) for piece in pieces]
        self.pieces = [] if self.literal is not None else [
            re.compile("".join(_regex(token) for token in piece), re.DOTALL) for piece in pieces]

    def matches(self, name: str) -> bool:
        if self.literal is not None:
            return name == self.literal
        first, last = self.pieces[0], self.pieces[-1]
        if not self.starred:
            return first.fullmatch(name) is not None
        end = len(name) - self.lengths[-1]  # where the last piece must start
        if end < self.lengths[0] or first.match(name) is None or last.fullmatch(name, end) is None:
            return False
        position = self.lengths[0]
        for piece in self.pieces[1:-1]:
            found = piece.search(name, position, end)
            if found is None:
                return False
            position = found.end()
        return True


def _regex(token: Token) -> str:
    """A star-free token as a regular expression of one character."""
    if isinstance(token, str):
        return re.escape(token)
    if isinstance(token, _Class):
        ranges = "".join(re.escape(low) if low == high else f"{re.escape(low)}-{re.escape(high)}"
                         for low, high in token.ranges if low <= high)
        if not ranges:  # only reversed ranges ('[z-a]'): no character, or any if negated
            return "." if token.negated else "(?!)"
        return f"[{'^' if token.negated else ''}{ranges}]"
    return "."
