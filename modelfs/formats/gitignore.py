"""One gitignore line, compiled and matched against a model's paths in polynomial time.

Why not one regex per line (what the ``pathspec`` library does): a glob turned into a regular
expression (``*`` -> ``[^/]*``) backtracks exponentially in Python's ``re`` --
``*a*a*a*a*a*a*a*a*a*a*b`` against a 60-character name did not finish in a minute, and an
operator's ``*a*a*a*a*a*a*a*a*.gguf`` against a publisher's 240-character name hung the mount
before it served, a pull or an extract with it. Here a line is split at ``/`` into segments,
a segment at its stars into star-free pieces found left to right (:class:`_Glob`), and ``**``
segments by a set of reachable positions over the path's parts: a 4,096-byte path against a
4,096-byte pattern stays in milliseconds, and 200,000 paths against three lines take 0.5-0.9 s
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

    def matches(self, parts: list[str]) -> bool:
        """Whether this line matches the file whose path is ``parts`` (or a directory above it)."""
        # the common shapes first ('*.gguf', 'docs/', 'a/b.json'): no set of positions to keep
        upto = len(parts) - 1 if self.directory_only else len(parts)  # the parts a match may end at
        if len(self.segments) == 2 and self.segments[0] is None and self.segments[1] is not None:
            glob = self.segments[1]
            return any(glob.matches(part) for part in parts[:upto])
        if None not in self.segments:
            count = len(self.segments)
            return count <= upto and all(glob is not None and glob.matches(part)
                                         for glob, part in zip(self.segments, parts[:count], strict=True))
        reach = {0}
        for segment in self.segments:
            if segment is None:
                reach = set(range(min(reach), len(parts) + 1))
            else:
                reach = {j + 1 for j in reach if j < len(parts) and segment.matches(parts[j])}
            if not reach:
                return False
        # the whole path, or a directory above the file (everything under a matched directory;
        # the root is no match: '**/' is any directory, and a file at the root is under none)
        return any(0 < j < len(parts) or (j == len(parts) and not self.directory_only) for j in reach)


def compile_line(pattern: str, where: str) -> Line:
    """A gitignore line compiled, or InvalidPattern in one line saying why it is none."""
    if len(pattern.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise InvalidPattern(f"{where}: a pattern of {len(pattern):,} characters is longer than any path of a model "
                             f"({MAX_PATH_BYTES} bytes)")
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
        pieces: list[list[Token]] = [[]]
        for token in tokens:
            if token is _Wild.STAR:
                pieces.append([])
            else:
                pieces[-1].append(token)
        self.starred = len(pieces) > 1
        self.lengths = [len(piece) for piece in pieces]
        self.pieces = [re.compile("".join(_regex(token) for token in piece), re.DOTALL) for piece in pieces]

    def matches(self, name: str) -> bool:
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
