"""JSON from a signature, read within bounds.

Bundles, statements and simple-signing payloads come from whoever can push to a
repository, so they are read as hostile: a size cap before parsing, a nesting cap checked
without recursion (Python's own parser would raise RecursionError near depth 1000, or use
the memory of a 100 MB document), and a cap on how many entries a statement may list.
"""

from __future__ import annotations

import json
from typing import Any

MAX_BUNDLE_BYTES = 16 << 20  # an OMS statement lists each file: ~150 bytes each, so ~100k files
MAX_PAYLOAD_BYTES = 64 << 10  # a cosign simple-signing payload is a few hundred bytes
MAX_DEPTH = 32  # a bundle nests 6 deep, a statement 5
MAX_RESOURCES = 200_000  # files (or shards) one OMS statement may list


class Malformed(ValueError):
    """A signature document that cannot be read; the message says why, in a few words."""


def _depth(text: str) -> int:
    """The deepest nesting of objects and arrays in ``text``, strings skipped."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def load(data: bytes | str, what: str, max_bytes: int = MAX_BUNDLE_BYTES) -> dict[str, Any]:
    """A JSON object of at most ``max_bytes`` bytes and ``MAX_DEPTH`` levels."""
    if len(data) > max_bytes:
        raise Malformed(f"{what} is {len(data):,} bytes, over the {max_bytes:,}-byte limit")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise Malformed(f"{what} is not UTF-8") from None
    if _depth(text) > MAX_DEPTH:
        raise Malformed(f"{what} nests deeper than {MAX_DEPTH} levels")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise Malformed(f"{what} is not JSON ({str(exc).split(':')[0]})") from None
    if not isinstance(doc, dict):
        raise Malformed(f"{what} is not a JSON object")
    return doc


def field(doc: Any, key: str, kind: type, what: str) -> Any:
    """``doc[key]``, which must be of ``kind``."""
    value = doc.get(key) if isinstance(doc, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise Malformed(f"{what}: {key!r} is missing or not a {kind.__name__}")
    return value
