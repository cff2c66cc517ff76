"""What an OMS statement asks to be proved by reading: a file's signed hash, checked when the
file is read, because no digest the manifest holds can stand in for it.

A raw layer signed with its sha256 needs nothing here: the signed digest is the layer digest
(:mod:`.statement`). Everything else an OMS statement signs does: a file inside a tar layer
(raw tar, tar+gzip, tar+zstd), a file hashed with blake2b or blake3, a file signed as several
shards (``shards`` method: each byte range's digest). Each is a list of :class:`Shard`, a
whole-file digest being one shard from 0 to the file's end. The data path (mount, and pull
through it: :mod:`modelfs.mount.filecheck`) and ``extract`` (the staged files) hash those
bytes with the signed algorithm and serve or keep nothing of a range before it matched.

Which files a tar layer holds only its listing says, so whether every file of the artifact
is covered is judged again once the files are listed (:meth:`FileChecks.judge_listing`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import SignatureError

log = logging.getLogger("modelfs.signing")

# OMS's algorithm names (model_signing 1.1.1: "sha256", "blake2b", "blake3", and
# "<name>-sharded-<shard size>" for shards) -> a maintained implementation of each.


def _blake3() -> Any:
    import blake3  # a dependency already: block index v2
    return blake3.blake3()


SIGNATURE_FILE = "model.sig"  # model_signing's default output, named by the Modelfile: not itself signed
HASHERS: dict[str, Callable[[], Any]] = {"sha256": hashlib.sha256, "blake2b": hashlib.blake2b, "blake3": _blake3}
DIGEST_HEX = {"sha256": 64, "blake2b": 128, "blake3": 64}


def shown(path: str) -> str:
    """A path as a message names it: a name from the artifact (a tar member, a layer's file
    path) or a statement may hold a newline, which must not split the one-line error or forge
    a log line, or run to thousands of characters."""
    path = path if len(path) <= 200 else path[:200] + "…"
    return path if path.isprintable() else repr(path)


def base_algorithm(algorithm: str) -> str:
    """``sha256-sharded-1048576`` -> ``sha256``."""
    return algorithm.split("-sharded-", 1)[0]


@dataclass(frozen=True)
class Shard:
    """Bytes [start, end) of a file, signed with ``algorithm`` as ``digest`` (hex); ``end``
    is WHOLE for a whole-file digest (the file's size is known only once it is listed)."""

    start: int
    end: int
    algorithm: str  # a key of HASHERS
    digest: str

    def hasher(self) -> Any:
        return HASHERS[self.algorithm]()

    def span(self, size: int) -> tuple[int, int]:
        return self.start, size if self.end == WHOLE else self.end

    def describe(self, size: int) -> str:
        """How a message names it: the whole file, or its byte range."""
        start, end = self.span(size)
        whole = start == 0 and end == size
        return self.algorithm if whole else f"bytes {start:,}-{end:,}: {self.algorithm}"


WHOLE = -1


def tiling_problem(shards: tuple[Shard, ...], size: int) -> str | None:
    """Why ``shards`` (in order) do not cover bytes [0, size) exactly once, if they do not: a
    file longer than what was signed must not have its tail served unchecked."""
    position = 0
    for shard in shards:
        start, end = shard.span(size)
        if start != position or end < start or end > size:
            return f"its signed shards do not cover it exactly (bytes {start:,}-{end:,} of {size:,})"
        position = end
    return None if position == size else f"its signed shards end at byte {position:,}, the file at {size:,}"


@dataclass(frozen=True)
class FileChecks:
    """The per-file checks a met verdict leaves to the data path, and what it knows of coverage."""

    pending: Mapping[str, tuple[Shard, ...]]  # path -> its shards, in order, to check when read
    vouched: frozenset[str]  # paths whose signed sha256 is their raw layer's digest
    signed: frozenset[str]  # every path a counting statement lists
    where: str  # the signature(s), for messages: "model.sig in the artifact"
    mode: str  # the policy's: enforce or warn
    reference: str = ""
    listed_later: bool = False  # the artifact has tar layers: their files are judged once listed
    # path -> each statement's own shards of it, which must tile the file (``pending`` is their
    # union: two signers may cut one file differently, and both are checked); none: ``pending``
    tilings: Mapping[str, tuple[tuple[Shard, ...], ...]] = field(default_factory=dict)

    def shards(self, path: str) -> tuple[Shard, ...]:
        return self.pending.get(path, ())

    @property
    def enforcing(self) -> bool:
        return self.mode == "enforce"

    def mismatch(self, path: str, shard: Shard, size: int) -> str:
        """The one line a file whose bytes differ from the signed statement is refused with."""
        return f"{shown(path)}: {shard.describe(size)} differs from the signed statement ({self.where})"

    def judge_listing(self, files: Mapping[str, int | None]) -> list[str]:
        """Every regular file of the listed artifact (path -> size; None for a file outside a
        view, neither read nor served) against the statements: a file none covers, a signed
        file the artifact lacks, or shards that do not cover their file exactly, refuse the
        model under ``enforce`` (SignatureError), and are logged under ``warn``. Returns the
        problems."""
        listed = set(files) - {SIGNATURE_FILE}
        sized = {path: size for path, size in files.items() if size is not None}
        problems = [f"{shown(path)} is not listed" for path in sorted(listed - self.vouched - set(self.pending))[:3]]
        problems += [f"{shown(path)} is signed but missing from the artifact" for path in sorted(self.signed - listed)[:3]]
        problems += [f"{shown(path)}: {problem}" for path, problem in
                     ((p, self._tiling(p, sized[p])) for p in sorted(set(sized) & set(self.pending))) if problem][:3]
        if problems:
            line = (f"{self.reference} is not signed as the policy requires: {self.where} (OMS model signature): "
                    + "; ".join(problems[:3]))
            if self.enforcing:
                raise SignatureError(line)
            log.warning("signatures = warn: serving anyway: %s", line)
        return problems


    def _tiling(self, path: str, size: int) -> str | None:
        """Why the shards of ``path`` do not cover it exactly, judged per statement."""
        for shards in self.tilings.get(path) or (self.pending[path],):
            problem = tiling_problem(shards, size)
            if problem:
                return problem
        return None


def merge(parts: list[tuple[str, Any]], mode: str, reference: str) -> FileChecks | None:
    """The checks of every counting OMS statement (``(where, Coverage)``) together: a file is
    covered if one covers it, and checked against every shard any of them signed. None when
    nothing is left to check or to list. Linear in the shards: a statement may list 200,000,
    and a walk of a list per shard took half an hour for that many (2.9 s for 8,000 here)."""
    pending: dict[str, set[Shard]] = {}
    tilings: dict[str, set[tuple[Shard, ...]]] = {}
    vouched: set[str] = set()
    signed: set[str] = set()
    listed_later = False
    for _, coverage in parts:
        for path, shards in coverage.checks.items():
            pending.setdefault(path, set()).update(shards)
            tilings.setdefault(path, set()).add(tuple(shards))
        vouched |= coverage.vouched
        signed |= coverage.signed
        listed_later = listed_later or coverage.listed_later
    if not pending and not listed_later:
        return None
    where = ", ".join(sorted({where for where, _ in parts}))
    ordered = {path: tuple(sorted(shards, key=lambda s: (s.start, s.end))) for path, shards in pending.items()}
    return FileChecks(ordered, frozenset(vouched), frozenset(signed), where, mode, reference, listed_later,
                      {path: tuple(groups) for path, groups in tilings.items()})
