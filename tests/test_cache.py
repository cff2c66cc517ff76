"""The block cache on real files: compression policy, per-block trust, checksums on every
read back (flipped bytes, holes, wrong map lengths), replacement instead of in-place
emptying, and block writes from worker threads racing a clear."""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time

import pytest

from modelfs.mount.cache import _ENTRY, _HEADER_SIZE, RECHECK_SECONDS, BlockCache, BlockDamaged, aligned_buffer

MiB = 1 << 20


def _blob(*blocks: bytes) -> str:
    return "sha256:" + hashlib.sha256(b"".join(blocks)).hexdigest()


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


def test_trust_is_per_block_and_per_index_hash(tmp_path):
    cache = BlockCache(str(tmp_path))
    blocks = [os.urandom(MiB), os.urandom(MiB // 2)]
    entry = cache.entry(_blob(*blocks), MiB + MiB // 2)
    good = hashlib.sha256(blocks[0]).digest()
    entry.write_block(0, blocks[0], index_hash=good)
    entry.write_block(1, blocks[1])  # unverified
    assert entry.trusted(0, good)
    assert not entry.trusted(0, b"\1" * 32)  # another index's hash: not ours to trust
    assert not entry.trusted(0, None)
    assert not entry.trusted(1, hashlib.sha256(blocks[1]).digest())
    assert entry.complete and not entry.verified
    assert entry.verify()
    assert entry.verified and entry.trusted(1, None)
    # trust survives a reopen (it lives in the map, per block)
    assert BlockCache(str(tmp_path)).entry(entry.digest, entry.size).verified


def test_a_blob_that_does_not_match_is_dropped(tmp_path):
    cache = BlockCache(str(tmp_path))
    blocks = [os.urandom(MiB), os.urandom(MiB)]
    entry = cache.entry(_blob(*blocks), 2 * MiB)
    entry.write_block(0, blocks[0])
    entry.write_block(1, os.urandom(MiB))
    assert not entry.verify()
    assert not entry.has(0) and not entry.has(1)


@pytest.mark.parametrize("damage", ["flip", "hole", "short_length", "long_length", "flip_lz4"])
def test_damage_at_rest_is_caught_on_read_back(tmp_path, damage):
    cache = BlockCache(str(tmp_path))
    block = (b"tokenizer vocabulary " * 60000)[:MiB] if damage == "flip_lz4" else os.urandom(MiB)
    entry = cache.entry(_blob(block, block, block), 3 * MiB)
    for index in range(3):
        entry.write_block(index, block)
    assert entry.verify()
    if damage in ("flip", "flip_lz4"):
        with open(entry.data_path, "r+b") as handle:
            handle.seek(MiB + 100)
            byte = handle.read(1)
            handle.seek(MiB + 100)
            handle.write(bytes([byte[0] ^ 0x40]))
    elif damage == "hole":  # what a power cut leaves: the map landed, the data did not
        with open(entry.data_path, "r+b") as handle:
            os.truncate(handle.fileno(), 0)
            os.truncate(handle.fileno(), 3 * MiB)
    else:
        offset = _HEADER_SIZE + _ENTRY.size
        with open(entry.map_path, "r+b") as handle:
            handle.seek(offset)
            length = struct.unpack("<I", handle.read(4))[0]
            handle.seek(offset)
            handle.write(struct.pack("<I", length // 4 if damage == "short_length" else length + 4096))
    reopened = BlockCache(str(tmp_path)).entry(entry.digest, entry.size)  # a later mount, offline or not
    with pytest.raises(BlockDamaged):
        reopened.read_block(1)
    assert reopened.scrub() == (3 if damage == "hole" else 1)
    assert not reopened.verified and not reopened.has(1)


def test_clear_replaces_files_so_another_holder_never_reads_zeros(tmp_path):
    """One mount evicts (or fails a check and clears) while another holds the blob open:
    the holder keeps reading the bytes it had, then notices the new files."""
    blocks = [os.urandom(MiB) for _ in range(8)]
    digest = _blob(*blocks)
    ours = BlockCache(str(tmp_path)).entry(digest, 8 * MiB)
    theirs = BlockCache(str(tmp_path)).entry(digest, 8 * MiB)  # own descriptors, like another process
    for index, block in enumerate(blocks):
        ours.write_block(index, block)
    assert ours.verify()
    assert all(theirs.has(i) for i in range(8))
    ours.clear()
    ours.write_block(7, blocks[7])  # the evicting mount fetches its last block again
    for index in range(8):  # before noticing: the old, valid bytes (never holes read as zeros)
        if theirs.has(index):
            assert theirs.read_block(index) == blocks[index]
    time.sleep(RECHECK_SECONDS + 0.1)
    assert not theirs.has(0) and theirs.has(7) and not theirs.verified
    assert theirs.read_block(7) == blocks[7]


def test_eviction_by_another_process_is_noticed_and_frees_the_files(tmp_path):
    blocks = [os.urandom(MiB)]
    digest = _blob(*blocks)
    holder = BlockCache(str(tmp_path))
    entry = holder.entry(digest, MiB)
    entry.write_block(0, blocks[0])
    BlockCache(str(tmp_path)).evict(digest)  # `cache prune` in another process
    assert holder.release_replaced() == 1
    assert not entry.is_open
    assert not entry.has(0)  # reopened on use: fresh, empty files


def test_open_files_are_bounded(tmp_path):
    cache = BlockCache(str(tmp_path), max_open=4)
    entries = [cache.entry(f"sha256:{i:064x}", MiB) for i in range(20)]
    assert cache.open_files() <= 2 * 4 + 2
    data = os.urandom(MiB)
    for entry in entries:
        entry.write_block(0, data)
    assert cache.open_files() <= 2 * 4 + 2
    assert all(entry.read_block(0) == data for entry in entries)


def test_writes_from_threads_racing_clear_never_leave_a_wrong_block(tmp_path):
    """Block writes run in worker threads while a clear replaces the files on the event loop;
    whatever the map claims afterwards must read back as the block that was written."""
    block = 64 << 10
    cache = BlockCache(str(tmp_path), block_size=block)
    blocks = [os.urandom(block) for _ in range(32)]
    entry = cache.entry("sha256:" + "cd" * 32, len(blocks) * block)
    for _ in range(30):  # bounded: each round writes every block once while clearing
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


def test_a_map_of_another_format_is_replaced_not_emptied_in_place(tmp_path):
    """An old map (another format, another block size) held open by an older daemon: the new
    one starts afresh in new files, and whoever holds the old ones keeps its bytes."""
    digest = "sha256:" + "ee" * 32
    directory = tmp_path / "blobs" / "sha256"
    directory.mkdir(parents=True)
    (directory / f"{'ee' * 32}.map").write_bytes(b"MFSMAP01" + bytes(200))
    data = os.urandom(MiB)
    (directory / f"{'ee' * 32}.data").write_bytes(data)
    with open(directory / f"{'ee' * 32}.data", "rb") as old_reader:
        entry = BlockCache(str(tmp_path)).entry(digest, MiB)
        assert not entry.has(0)
        assert old_reader.read() == data  # not truncated under the older reader
    entry.write_block(0, data)
    assert BlockCache(str(tmp_path)).entry(digest, MiB).read_block(0) == data


def test_blocks_from_aligned_buffers_go_to_disk_directly_and_read_back_equal(tmp_path):
    """Full raw blocks in page-aligned buffers are written with O_DIRECT where the filesystem
    takes it (the page cache keeps no second copy); the last, short block and bytes objects
    through the page cache. Every one reads back equal, whichever way it went."""
    cache = BlockCache(str(tmp_path))
    blocks = [os.urandom(MiB) for _ in range(3)] + [os.urandom(12345)]
    entry = cache.entry(_blob(*blocks), 3 * MiB + 12345)
    for index, block in enumerate(blocks):
        if index % 2 == 0:
            buffer = aligned_buffer(len(block))
            buffer[:] = block
            assert entry.write_block(index, buffer) is not None
        else:
            assert entry.write_block(index, block) is not None
    assert [entry.read_block(i) for i in range(4)] == blocks
    assert entry.digest_matches()[0]
    reopened = BlockCache(str(tmp_path)).entry(entry.digest, entry.size)
    assert [reopened.read_block(i) for i in range(4)] == blocks


@pytest.mark.parametrize("refused_at", ["open", "write"])
def test_a_filesystem_refusing_direct_io_gets_buffered_writes(tmp_path, monkeypatch, caplog, refused_at):
    """Some filesystems refuse O_DIRECT when the file is opened (EINVAL), others on the first
    write: either way the block goes through the page cache, and later ones do not try again."""
    import errno
    import fcntl

    from modelfs.mount import cache as cache_module
    real_open, real_pwrite = os.open, os.pwrite

    def direct(fd: int) -> bool:
        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & cache_module._O_DIRECT)

    def open_(path, flags, *args):
        if flags & cache_module._O_DIRECT and refused_at == "open":
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def pwrite(fd, data, offset):
        if refused_at == "write" and direct(fd):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "pwrite", pwrite)
    caplog.set_level("INFO", logger="modelfs.mount.cache")
    cache = BlockCache(str(tmp_path))
    blocks = [os.urandom(MiB) for _ in range(3)]
    entry = cache.entry(_blob(*blocks), 3 * MiB)
    for index, block in enumerate(blocks):
        buffer = aligned_buffer(MiB)
        buffer[:] = block
        entry.write_block(index, buffer)
    assert [entry.read_block(i) for i in range(3)] == blocks
    assert [r.getMessage() for r in caplog.records].count(
        f"cache filesystem refuses O_DIRECT (Invalid argument); writing {entry.digest} through the page cache") == 1


def test_workers_writing_other_blocks_do_not_wait_for_each_other_and_all_land(tmp_path):
    cache = BlockCache(str(tmp_path))
    blocks = [os.urandom(MiB) for _ in range(32)]
    entry = cache.entry(_blob(*blocks), 32 * MiB)

    def write(indexes: range) -> None:
        for index in indexes:
            buffer = aligned_buffer(MiB)
            buffer[:] = blocks[index]
            entry.write_block(index, buffer, hashlib.sha256(blocks[index]).digest())

    threads = [threading.Thread(target=write, args=(range(i, 32, 4),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert entry.complete and [entry.read_block(i) for i in range(32)] == blocks
    assert all(entry.trusted(i, hashlib.sha256(blocks[i]).digest()) for i in range(32))


def test_one_prune_evicts_least_recently_used_first_and_spares_what_it_is_told(tmp_path):
    """The eviction `cache prune` and a mount's size limit both run: least recently used
    first, down to what is kept, never a pinned blob, and nothing while under ``over``."""
    from modelfs.mount.cache import prune

    cache = BlockCache(str(tmp_path))
    digests = ["sha256:" + f"{n}" * 64 for n in range(1, 5)]
    for age, digest in enumerate(digests):  # digests[0] is the least recently used
        cache.entry(digest, MiB).write_block(0, os.urandom(MiB))
        for suffix in (".map", ".data"):
            path = os.path.join(str(tmp_path), "blobs", "sha256", digest[7:] + suffix)
            os.utime(path, (1000 + age, 1000 + age))
    blob = next(u.disk_bytes for u in cache.usage())
    assert prune(cache, 0, over=4 * blob).evicted == []  # not over: nothing goes
    pruned = prune(cache, 2 * blob, pinned={digests[0]})
    assert [u.digest for u in pruned.evicted] == digests[1:3] and pruned.left == 2 * blob
    assert {u.digest for u in cache.usage()} == {digests[0], digests[3]}
