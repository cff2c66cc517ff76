"""Serving a model through a real mount the way loaders read it (doc/ARCHITECTURE.md, "One
read, traced"): warm reads of cached blocks read each block from disk once, and readers that
interleave over one file each get read-ahead."""

from __future__ import annotations

import json
import os
import re
import struct
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio
from conftest import free_port

from modelfs.mount.fetcher import Fetcher, FetchPolicy
from modelfs.mount.readback import ReadBacks
from modelfs.mount.stats import Stats
from modelfs.storage.cache import BlockCache
from modelfs.testing.registry import FakeRegistry, index_of

MiB = 1 << 20
SIZE = 128 * MiB
READERS = 16


@pytest.fixture(scope="module")
def shards(registry, session_cli, tmp_path_factory):
    """A safetensors file (8-byte header length, JSON header, tensors): tensor data starts at
    8 + header length, so a loader's 1 MiB reads each span two blocks."""
    context = tmp_path_factory.mktemp("shards")
    tensors = 16
    each = SIZE // tensors
    header = {f"layer.{i}.weight": {"dtype": "F32", "shape": [each // 4], "data_offsets": [i * each, (i + 1) * each]}
              for i in range(tensors)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(23)
    with open(context / "model.safetensors", "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        out.write(rng.bytes(SIZE))
    (context / "Modelfile").write_text("NAME shards\nMODEL model.safetensors\n")
    ref = f"{registry.address}/test/shards:v1"
    session_cli.run("build", "-t", ref, str(context))
    session_cli.run("push", "--plain-http", ref)
    return ref, context / "model.safetensors", 8 + len(raw)


def _mount(mounts, ref: str) -> tuple[Path, str]:
    port = free_port()
    target = mounts.mount(ref, "--prefetch", "none", "--metrics", f"127.0.0.1:{port}")
    return target / "model.safetensors", f"http://127.0.0.1:{port}/metrics"


def _metric(url: str, name: str) -> float:
    found = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", httpx.get(url).text, re.M)
    assert found, f"{name} not exposed"
    return float(found.group(1))


def _sequential(path: Path, start: int) -> bytes:
    with open(path, "rb", buffering=0) as handle:
        handle.seek(start)
        parts = []
        while chunk := handle.read(MiB):
            parts.append(chunk)
    return b"".join(parts)


def _interleaved(path: Path, chunk: int) -> bytes:
    """``READERS`` threads, each reading its own part of the file in ``chunk`` preads."""
    size = path.stat().st_size
    part = -(-size // READERS)
    got: dict[int, bytes] = {}
    fd = os.open(path, os.O_RDONLY)

    def read(reader: int) -> None:
        offset, end = reader * part, min(size, (reader + 1) * part)
        pieces = []
        while offset < end:
            piece = os.pread(fd, min(chunk, end - offset), offset)
            assert piece
            pieces.append(piece)
            offset += len(piece)
        got[reader] = b"".join(pieces)

    try:
        threads = [threading.Thread(target=read, args=(reader,)) for reader in range(READERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        os.close(fd)
    return b"".join(got[reader] for reader in range(READERS))


def test_a_warm_straddling_read_reads_each_cached_block_back_once(mounts, shards):
    """Tensor data starts at 8 + header length: a loader's 1 MiB reads each span two blocks,
    and its 16 threads read side by side. Every block is read back from the cache and checked
    once (single flight, then the memory window), not once per read that touches it."""
    ref, local, start = shards
    expected = local.read_bytes()
    path, _ = _mount(mounts, ref)
    assert _sequential(path, 0) == expected  # cold: every block fetched and cached
    mounts.umount(path.parent)
    path, metrics = _mount(mounts, ref)
    assert _sequential(path, start) == expected[start:]
    read_back = _metric(metrics, "modelfs_cache_read_back_bytes_total")
    assert _metric(metrics, "modelfs_registry_bytes_total") == 0
    assert 0.95 * SIZE <= read_back <= 1.1 * SIZE, read_back / SIZE
    mounts.umount(path.parent)
    path, metrics = _mount(mounts, ref)
    assert _interleaved(path, 8 * MiB) == expected
    read_back = _metric(metrics, "modelfs_cache_read_back_bytes_total")
    assert 0.95 * SIZE <= read_back <= 1.1 * SIZE, read_back / SIZE


def test_interleaved_readers_each_get_read_ahead(mounts, shards):
    """16 threads, each reading its own part of one file (Run:ai's streamer: 8 MiB preads):
    read-ahead per stream makes each stream's requests grow as one sequential reader's do.
    One read-ahead state per blob saw random reads: about one request per block."""
    ref, local, _ = shards
    path, metrics = _mount(mounts, ref)
    assert _interleaved(path, 8 * MiB) == local.read_bytes()
    requests = _metric(metrics, "modelfs_fetch_requests_total")
    blocks = SIZE // MiB + 1
    # one sequential reader: about 10 here (16-32 blocks each); each of 16 streams starts with
    # a few small requests while its window grows
    assert requests <= blocks / 3, requests


def test_read_backs_are_single_flight_and_never_served_across_a_drop():
    """Reads of one cached block at once cost one disk read (on a worker); bytes read back
    while the blob's bytes were dropped are not served (the reader looks again)."""
    class Entry:
        def __init__(self) -> None:
            self.reads: list[int] = []

        def read_block(self, index: int) -> bytes:
            self.reads.append(index)
            time.sleep(0.05)
            return bytes([index]) * 4

    async def main() -> None:
        entry, drops, stats = Entry(), [0], Stats()
        backs = ReadBacks(entry, trio.CapacityLimiter(4), stats, lambda: drops[0])  # type: ignore[arg-type]
        got: list[dict] = []

        async def read(blocks: list[int]) -> None:
            got.append(await backs.read(blocks))

        async with trio.open_nursery() as nursery:
            for blocks in ([1, 2], [2, 3], [2]):
                nursery.start_soon(read, blocks)
        assert sorted(entry.reads) == [1, 2, 3]  # block 2 read once for three reads
        assert all(answer[index] == bytes([index]) * 4 for answer in got for index in answer)
        assert sorted(len(answer) for answer in got) == [1, 2, 2] and stats.bytes_read_back == 12

        async def drop_meanwhile() -> None:
            await trio.sleep(0.01)
            drops[0] += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, [5])
            nursery.start_soon(drop_meanwhile)
        assert got[-1] == {}

    trio.run(main)


def test_a_read_joining_a_read_back_begun_before_a_drop_is_not_served_its_bytes():
    """A read-back of block 5 started (its thread has the old bytes), then the blob's bytes
    were dropped (found wrong), then a second read of block 5 joined that read-back: the
    joiner must not be served the bytes read before the drop (it counted drops only from
    its own start, after the drop, and took them)."""
    class Entry:
        def read_block(self, index: int) -> bytes:
            time.sleep(0.1)
            return b"old!"

    async def main() -> None:
        drops = [0]
        backs = ReadBacks(Entry(), trio.CapacityLimiter(4), Stats(), lambda: drops[0])  # type: ignore[arg-type]
        got: dict[str, dict] = {}

        async def read(who: str) -> None:
            got[who] = await backs.read([5])

        async def drop_then_read() -> None:
            await trio.sleep(0.02)
            drops[0] += 1  # the one drop path ran: the old bytes are gone for good
            await read("after the drop")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, "before the drop")
            nursery.start_soon(drop_then_read)
        assert got == {"before the drop": {}, "after the drop": {}}

    trio.run(main)


def test_a_read_across_blocks_keeps_its_memory_block_while_the_other_is_read_back(tmp_path):
    """A read of two blocks, one in memory and one read back from the cache: while it waits
    for the read-back, the block in memory is pushed out of RecentBlocks (its buffer offered
    for reuse, its view released). The read still gets exactly the blob's bytes (it was an
    EIO, "operation forbidden on released memoryview object", in benchmarks.ready)."""
    bs = 64 * 1024
    fake = FakeRegistry()
    data = os.urandom(2 * bs)
    digest = fake.add_blob(data)
    index = index_of(data, block_size=bs)
    cache = BlockCache(str(tmp_path), block_size=bs)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fetcher = Fetcher(cache, fake, "r", nursery, FetchPolicy(workers=1, recent_blocks=1), index=index,
                              range_reader=fake)
            reader = fetcher.reader(digest, len(data))
            await reader.ensure([0, 1])
            fetcher.recent.drop(digest, [1])  # block 1 on disk only: read back on a worker
            block = fetcher.buffers.take(bs)  # block 0 in memory, in a pooled buffer, as a fetch leaves it
            block[:] = data[:bs]
            fetcher.recent.put(digest, 0, block)
            read_back = reader.readbacks.read

            async def evicting(blocks: list[int]) -> dict:
                fetcher.recent.put("sha256:" + "0" * 64, 0, fetcher.buffers.take(bs))  # pushes block 0 out
                return await read_back(blocks)

            reader.readbacks.read = evicting  # type: ignore[method-assign]
            assert bytes(await reader.read(bs - 100, 200)) == data[bs - 100:bs + 100]
            nursery.cancel_scope.cancel()

    trio.run(main)
