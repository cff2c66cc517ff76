"""The block cache on real files: compression policy, index-checked blocks, and block
writes from worker threads racing an eviction."""

from __future__ import annotations

import hashlib
import os
import threading

from modelfs.cache import BlockCache

MiB = 1 << 20


def test_lz4_only_where_it_pays(tmp_path):
    cache = BlockCache(str(tmp_path))
    text = cache.entry("sha256:" + "11" * 32, 2 * MiB)
    text.write_block(0, (b"the quick brown fox " * 60000)[:MiB])
    text.write_block(1, (b"jumps over the lazy dog " * 50000)[:MiB])
    noise = cache.entry("sha256:" + "22" * 32, 2 * MiB)
    blocks = [os.urandom(MiB), os.urandom(MiB)]
    noise.write_block(0, blocks[0])
    noise.write_block(1, blocks[1])
    assert text.stored_bytes() < 0.1 * 2 * MiB
    assert noise.stored_bytes() == 2 * MiB
    assert noise.read_block(1) == blocks[1]
    assert text.read_block(0) == (b"the quick brown fox " * 60000)[:MiB]


def test_blob_checked_block_by_block_needs_no_second_hash(tmp_path):
    cache = BlockCache(str(tmp_path))
    blocks = [os.urandom(MiB), os.urandom(MiB // 2)]
    digest = "sha256:" + hashlib.sha256(b"".join(blocks)).hexdigest()
    entry = cache.entry(digest, MiB + MiB // 2)
    entry.write_block(0, blocks[0], checked=True)
    assert not entry.all_checked
    entry.write_block(1, blocks[1], checked=True)
    assert entry.all_checked and entry.complete
    entry.clear()
    assert not entry.all_checked and not entry.complete


def test_block_stored_by_another_process_is_not_counted_as_checked(tmp_path):
    blocks = [os.urandom(MiB), os.urandom(MiB)]
    digest = "sha256:" + hashlib.sha256(b"".join(blocks)).hexdigest()
    ours = BlockCache(str(tmp_path)).entry(digest, 2 * MiB)
    theirs = BlockCache(str(tmp_path)).entry(digest, 2 * MiB)  # own descriptors, like another process
    theirs.write_block(1, blocks[1])
    ours.write_block(0, blocks[0], checked=True)
    ours.write_block(1, blocks[1], checked=True)  # already there: their copy stays
    assert ours.complete and not ours.all_checked  # so the mount hashes the whole blob instead
    assert ours.digest_matches()


def test_writes_from_threads_racing_clear_never_leave_a_wrong_block(tmp_path):
    """Block writes run in worker threads while eviction empties the blob on the event loop;
    whatever the map claims afterwards must read back as the block that was written."""
    block = 64 << 10
    cache = BlockCache(str(tmp_path), block_size=block)
    blocks = [os.urandom(block) for _ in range(32)]
    entry = cache.entry("sha256:" + "cd" * 32, len(blocks) * block)
    for _ in range(50):  # bounded: each round writes every block once while clearing
        writers = [threading.Thread(target=_write_blocks, args=(entry, blocks, start)) for start in (0, 1)]
        for writer in writers:
            writer.start()
        entry.clear()
        for writer in writers:
            writer.join()
        for index in range(entry.nblocks):
            if entry.has(index):
                assert entry.read_block(index) == blocks[index]


def _write_blocks(entry, blocks, start):
    for index in range(start, entry.nblocks, 2):
        entry.write_block(index, blocks[index])
