"""Checked blocks kept in memory (modelfs/mount/window.py): small reads of a cached block
(tar headers, 4 KiB pages) cost a lookup, not a 1 MiB read back, check and decompression;
the copy is bounded, and never outlives its block, its blob or the files it was read from,
whoever drops them (this process, or another sharing the cache)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelfs.errors import CacheError
from modelfs.storage.cache import BlockCache
from modelfs.storage.store import RECHECK_SECONDS, BlockDamaged
from modelfs.storage.window import OVERHEAD_BYTES, BlockWindow

MiB = 1 << 20
WEIGHT_TAR = "application/vnd.cncf.model.weight.v1.tar"


def _blob(*blocks: bytes) -> str:
    return "sha256:" + hashlib.sha256(b"".join(blocks)).hexdigest()


def _cached(tmp_path: Path, blocks: list[bytes], window: BlockWindow):
    entry = BlockCache(str(tmp_path), window=window).entry(_blob(*blocks), sum(map(len, blocks)))
    for index, block in enumerate(blocks):
        entry.write_block(index, block)
    assert entry.verify()
    return entry


def test_the_window_keeps_to_its_byte_bound_least_recently_used_out_first():
    window = BlockWindow(capacity=3 * (MiB + OVERHEAD_BYTES))
    blocks = [os.urandom(MiB) for _ in range(5)]
    for index in range(3):
        window.put("blob", index, "v", blocks[index])
    assert window.get("blob", 0, "v").data is blocks[0]  # held, not copied; now the most recent
    window.put("blob", 3, "v", blocks[3])
    window.put("blob", 4, "v", blocks[4])
    stats = window.stats()
    assert stats.held_bytes <= window.capacity and stats.held_blocks == 3 and stats.evicted == 2
    assert window.get("blob", 1, "v") is None and window.get("blob", 2, "v") is None
    assert [window.get("blob", i, "v").data for i in (0, 3, 4)] == [blocks[0], blocks[3], blocks[4]]
    window.put("other", 0, "v", os.urandom(4 * MiB))  # larger than the whole bound: not kept
    assert window.get("other", 0, "v") is None and window.stats().held_blocks == 3
    assert window.get("blob", 0, "another version") is None  # and that copy is gone
    assert window.get("blob", 0, "v") is None
    window.drop("blob")
    assert window.stats().held_bytes == 0


def test_a_block_is_read_back_once_then_served_from_memory(tmp_path):
    window = BlockWindow()
    text = (b"tokenizer merges vocab " * 50000)[:MiB]  # lz4 in the cache: the costly read back
    entry = _cached(tmp_path, [text, os.urandom(MiB)], window)
    first = entry.read_block(0)
    assert all(entry.read_block(0) is first for _ in range(100))
    assert entry.read_block(0) == text
    assert window.stats().misses == 1 and window.stats().hits == 100 + 1


def test_forget_evict_and_clear_drop_the_copy(tmp_path):
    window = BlockWindow()
    blocks = [os.urandom(MiB) for _ in range(3)]
    entry = _cached(tmp_path, blocks, window)
    for index in range(3):
        entry.read_block(index)
    entry.forget(1)
    assert window.stats().held_blocks == 2
    with pytest.raises(CacheError):
        entry.read_block(1)
    entry.clear()
    assert window.stats().held_blocks == 0
    with pytest.raises(CacheError):
        entry.read_block(0)
    entry = _cached(tmp_path, blocks, window)
    entry.read_block(2)
    BlockCache(str(tmp_path), window=window).evict(entry.digest)
    assert window.stats().held_blocks == 0


def test_only_checked_bytes_enter_and_scrub_reads_the_disk(tmp_path):
    window = BlockWindow()
    blocks = [os.urandom(MiB) for _ in range(2)]
    entry = _cached(tmp_path, blocks, window)
    _flip(entry.data_path, 100)
    with pytest.raises(BlockDamaged):
        entry.read_block(0)
    assert window.stats().held_blocks == 0
    assert entry.read_block(1) == blocks[1]
    _flip(entry.data_path, MiB + 100)  # rots on disk while a copy is held
    assert entry.scrub() == 2  # read from disk, not from the copy
    assert window.stats().held_blocks == 0


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x40]))


_OTHER_PROCESS = """
import sys
from modelfs.storage.cache import BlockCache
root, digest, size, action = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
entry = BlockCache(root).entry(digest, size)
if action == "clear":  # what a mount does when the blob does not match its digest
    entry.clear()
else:  # the block dropped and stored again with other bytes: another checksum, same files
    entry.forget(1)
    entry.write_block(1, bytes(1 << 20))
"""


@pytest.mark.parametrize("action", ["clear", "rewrite"])
def test_another_process_clearing_or_rewriting_is_noticed_within_the_recheck_bound(tmp_path, action):
    window = BlockWindow()
    blocks = [os.urandom(MiB) for _ in range(3)]
    entry = _cached(tmp_path, blocks, window)
    assert entry.read_block(1) == blocks[1]
    subprocess.run([sys.executable, "-c", _OTHER_PROCESS, str(tmp_path), entry.digest, str(entry.size), action],
                   check=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)), timeout=60)
    time.sleep(RECHECK_SECONDS + 0.05)
    if action == "clear":
        assert not entry.has(0) and not entry.has(1)
        with pytest.raises(CacheError):
            entry.read_block(1)
    else:
        assert entry.read_block(1) == bytes(MiB)  # theirs, read back: never our stale copy
        assert entry.read_block(0) == blocks[0]


def test_a_blob_whose_files_cannot_be_set_up_still_works_with_the_window(tmp_path):
    """No disk for this blob (its map path is taken): nothing is stored, nothing read back,
    so nothing enters the window; the reader serves it from the blocks checked on arrival."""
    window = BlockWindow()
    digest = "sha256:" + "ab" * 32
    directory = tmp_path / "blobs" / "sha256"
    directory.mkdir(parents=True)
    (directory / f"{'ab' * 32}.map").mkdir()
    entry = BlockCache(str(tmp_path), window=window).entry(digest, MiB)
    assert type(entry).__name__ == "VolatileEntry"
    with pytest.raises(CacheError):
        entry.write_block(0, os.urandom(MiB))
    with pytest.raises(CacheError):
        entry.read_block(0)
    assert window.stats().held_blocks == 0


def test_a_model_served_from_memory_reads_right_through_the_mount(cli, mounts, minilm_ref, minilm_dir):
    """The no-disk case end to end: the weights blob's cache files cannot be set up."""
    layers = cli.run("inspect", "--plain-http", "--json", minilm_ref).stdout
    import json
    for layer in json.loads(layers)["manifest"]["layers"]:
        if layer["annotations"].get("org.cncf.model.filepath") == "model.safetensors":
            path = cli.cache_dir / "blobs" / "sha256" / f"{layer['digest'][7:]}.map"
            path.mkdir(parents=True)
    target = mounts.mount(minilm_ref, "--prefetch", "none")
    assert (target / "model.safetensors").read_bytes() == (minilm_dir / "model.safetensors").read_bytes()
    log = "".join(path.read_text() for path in (cli.cache_dir / "logs").iterdir())
    assert "serving sha256:" in log and "from memory, without caching it" in log
