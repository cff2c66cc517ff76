"""Crash consistency and a full disk: the cache never claims bytes it does not have."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from modelfs.errors import CacheError
from modelfs.storage.cache import BlockCache

MiB = 1 << 20


def test_sigkill_during_fetch_then_remount_reads_correct_bytes(cli, mounts, minilm_ref, minilm_dir):
    source = (minilm_dir / "model.safetensors").read_bytes()
    for attempt in range(3):  # kill at a few different moments of the prefetch
        target, pid = mounts.mount_daemon(minilm_ref, name="crash")  # prefetch all
        time.sleep(0.05 * attempt)
        # its workers are threads: killing the daemon leaves no process behind to orphan
        assert [c for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()] == []
        os.kill(pid, 9)
        cli.run("umount", str(target))
        mounts.active.remove(target)
    target = mounts.mount(minilm_ref, "--prefetch", "none")
    assert (target / "model.safetensors").read_bytes() == source
    mounts.umount(target)
    cache = BlockCache(str(cli.cache_dir))
    for usage in cache.usage():
        entry = cache.entry(usage.digest, usage.size)
        if entry.complete:
            assert entry.digest_matches(), usage.digest


def test_full_cache_disk_still_serves_correct_bytes(cli, mounts, minilm_ref, minilm_dir, tiny_tmpfs):
    target = mounts.mount(minilm_ref, "--prefetch", "none", "--cache-dir", str(tiny_tmpfs), "--log-level", "info")
    source = (minilm_dir / "model.safetensors").read_bytes()
    assert hashlib.sha256((target / "model.safetensors").read_bytes()).digest() == hashlib.sha256(source).digest()
    assert (target / "tokenizer.json").read_bytes() == (minilm_dir / "tokenizer.json").read_bytes()
    log = next((tiny_tmpfs / "logs").iterdir()).read_text()
    assert "serving without caching" in log and "No space left on device" in log
    assert os.listdir(target)  # the daemon is alive


def test_prefetch_into_a_full_cache_disk_stops_and_the_mount_lives_on(cli, mounts, minilm_ref, minilm_dir, tiny_tmpfs):
    target = mounts.mount(minilm_ref, "--cache-dir", str(tiny_tmpfs))  # prefetch all: 90 MB into 8 MiB
    log_dir = tiny_tmpfs / "logs"
    deadline = time.monotonic() + 60
    while "prefetch stopped" not in "".join(p.read_text() for p in log_dir.iterdir()):
        assert time.monotonic() < deadline, "".join(p.read_text() for p in log_dir.iterdir())
        time.sleep(0.2)
    log = "".join(p.read_text() for p in log_dir.iterdir())
    assert "prefetch stopped: the cache refuses new blocks (is its disk full?)" in log
    assert "Traceback" not in log
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (target / name).read_bytes() == (minilm_dir / name).read_bytes(), name


def test_cached_blocks_that_do_not_read_back_are_fetched_again(cli, mounts, minilm_ref, minilm_dir):
    source = (minilm_dir / "model.safetensors").read_bytes()
    target = mounts.mount(minilm_ref, "--prefetch", "none")
    assert (target / "model.safetensors").read_bytes() == source
    mounts.umount(target)
    digest = "sha256:" + hashlib.sha256(source).hexdigest()
    data = cli.cache_dir / "blobs" / "sha256" / (digest[7:] + ".data")
    os.truncate(data, len(source) // 3)  # the disk lost the tail; the map still claims it
    target = mounts.mount(minilm_ref, "--prefetch", "none")
    assert (target / "model.safetensors").read_bytes() == source
    mounts.umount(target)
    log = "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
    assert f"of {digest} is damaged" in log and "fetching it again" in log
    assert data.stat().st_size >= len(source) - (1 << 20)


def test_block_cut_short_by_a_full_disk_is_not_claimed(tiny_tmpfs):
    cache = BlockCache(str(tiny_tmpfs))
    entry = cache.entry("sha256:" + "ef" * 32, 16 * MiB)
    blocks = [os.urandom(MiB) for _ in range(16)]  # 16 MiB into an 8 MiB filesystem
    stored, refused = [], []
    for index, block in enumerate(blocks):
        try:
            entry.write_block(index, block)
            stored.append(index)
        except CacheError as exc:
            assert "No space left on device" in str(exc)
            refused.append(index)
    assert stored and refused
    reopened = BlockCache(str(tiny_tmpfs)).entry(entry.digest, 16 * MiB)
    for index in range(16):
        assert reopened.has(index) == (index in stored)
        if index in stored:
            assert reopened.read_block(index) == blocks[index]


def test_cache_map_never_claims_unwritten_blocks(tmp_path):
    cache = BlockCache(str(tmp_path))
    digest = "sha256:" + "ab" * 32
    entry = cache.entry(digest, 3 * MiB + 5)
    entry.write_block(1, os.urandom(MiB))
    # a process killed between the data write and the map write leaves data without a map entry
    with open(entry.data_path, "r+b") as data:
        data.write(os.urandom(MiB))
    cache.close()
    reopened = BlockCache(str(tmp_path)).entry(digest, 3 * MiB + 5)
    assert [reopened.has(i) for i in range(4)] == [False, True, False, False]
    assert not reopened.complete
    with pytest.raises(CacheError, match="block 0 .* is not cached"):
        reopened.read_block(0)

