"""The one trust decision per blob (modelfs/mount/trust.py): pure logic, beside the mounts
that exercise it in test_integrity."""

from __future__ import annotations

import os

from modelfs.formats.blockindex import ALGORITHMS
from modelfs.mount.trust import Mode, Trust
from modelfs.storage.cache import BlockCache

MiB = 1 << 20
BLAKE3 = ALGORITHMS["blake3"]


def test_a_mode_never_outranks_a_trusted_index():
    hashes = [b"h" * 32]
    assert Trust.decide(hashes, BLAKE3, vouched=True, lazy=True).mode is Mode.INDEX
    assert Trust.decide(hashes, BLAKE3, vouched=False, lazy=False).mode is Mode.INDEX
    assert Trust.decide(None, BLAKE3, vouched=True, lazy=True).mode is Mode.LAZY
    assert Trust.decide(None, BLAKE3, vouched=False, lazy=False).mode is Mode.WHOLE
    assert Trust.decide(hashes, BLAKE3, vouched=True, lazy=True).without_index().mode is Mode.WHOLE


def test_a_block_stored_unverified_is_served_lazily_only_where_no_index_exists(tmp_path):
    good, wrong = os.urandom(MiB), os.urandom(MiB)
    entry = BlockCache(str(tmp_path)).entry("sha256:" + "ab" * 32, 2 * MiB)
    entry.write_block(0, wrong)  # a lazy mount of another repository stored it, unverified
    entry.write_block(1, good, BLAKE3(good))  # matched on arrival against an index
    index = Trust.decide([BLAKE3(good), BLAKE3(good)], BLAKE3, vouched=True, lazy=True)
    lazy = Trust.decide(None, BLAKE3, vouched=False, lazy=True)
    whole = Trust.decide(None, BLAKE3, vouched=False, lazy=False)
    assert [index.accepts(entry, i) for i in (0, 1)] == [False, True]
    assert [lazy.accepts(entry, i) for i in (0, 1)] == [True, True]
    assert [whole.accepts(entry, i) for i in (0, 1)] == [False, False]
    assert not index.matches(0, index.index_hash(wrong)) and index.matches(1, index.index_hash(good))
    assert not index.covers(entry)

