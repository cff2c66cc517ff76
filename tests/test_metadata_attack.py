"""Metadata first under attack (issue 23): a hostile GGUF header and many big headers at
once. The pass must stay bounded in memory (pinned blocks) and in the serving loop's time.
Real-mount tests of the metadata pass: test_prefetch_mount.py."""

from __future__ import annotations

import json
import struct
import time
from types import SimpleNamespace

import pytest
import trio

from modelfs.mount import metadata
from modelfs.mount.metadata import MetadataFile, fetch_metadata, gguf_header_length
from modelfs.mount.prefetch import shard_order
from modelfs.mount.recent import RecentBlocks

MiB = 1 << 20


def _empty_pairs(n: int) -> bytes:
    """A GGUF header of ``n`` key-value pairs, each an empty key and a u8: 13 bytes a pair."""
    return b"GGUF" + struct.pack("<IQQ", 3, 0, n) + (struct.pack("<QI", 0, 0) + b"\0") * n


async def test_a_gguf_of_millions_of_tiny_pairs_lets_the_loop_serve_and_is_bounded():
    data = _empty_pairs(300_000)  # 3.9 MB; 2^40 pairs claimed changes nothing but the cut
    longest = [0.0]

    async def read(offset: int, size: int) -> bytes:
        return data[offset:offset + size]

    async def ticker(done: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Turns of the loop, as FUSE requests get them; the longest wait between two."""
        last = time.monotonic()
        task_status.started()
        while not done.is_set():
            await trio.lowlevel.checkpoint()
            now = time.monotonic()
            longest[0] = max(longest[0], now - last)
            last = now

    done = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(ticker, done)
        assert await gguf_header_length(read, len(data)) == len(data)
        done.set()
    assert longest[0] < 0.1, f"the loop waited {longest[0]:.2f} s on the parse"
    # more items than any real vocabulary: refused (read when asked for), not parsed for minutes
    many = _empty_pairs(1000)
    many = many[:16] + struct.pack("<Q", 1 << 40) + many[24:]
    with pytest.raises(Exception, match="more than|cut short|runs past"):
        await gguf_header_length(read, len(many))


async def test_gguf_items_are_capped(monkeypatch):
    monkeypatch.setattr(metadata, "GGUF_ITEMS_MAX", 1000, raising=False)
    data = _empty_pairs(2000)

    async def read(offset: int, size: int) -> bytes:
        return data[offset:offset + size]

    with pytest.raises(Exception, match="more than 1000 items"):
        await gguf_header_length(read, len(data))


class _Blob:
    def __init__(self) -> None:
        self.entry = SimpleNamespace(block_size=MiB)


class _Reader:
    """A blob of ``nblocks`` servable blocks whose reads take a turn of the loop (a read-back)."""

    def __init__(self, digest: str, nblocks: int, recent: RecentBlocks) -> None:
        self.digest, self.size, self.whole_mode = digest, nblocks * MiB, False
        self.blob = _Blob()
        self.ctx = SimpleNamespace(recent=recent)

    def servable(self, index: int) -> bool:
        return True

    def block_length(self, index: int) -> int:
        return MiB

    async def ensure(self, blocks: list[int], foreground: bool = False) -> None:
        raise AssertionError("all servable")

    async def blocks(self, first: int, last: int) -> list[memoryview]:
        await trio.sleep(0.001)
        return [memoryview(bytearray(MiB)) for _ in range(first, last + 1)]


async def test_headers_read_at_once_pin_no_more_than_the_bound(monkeypatch):
    monkeypatch.setattr(metadata, "PIN_MAX", 8 * MiB)
    recent = RecentBlocks(capacity=4)
    header = 6 * MiB - 8  # 6 blocks of header a file, 10 files: 60 MiB asked, 8 MiB allowed

    files = []
    for n in range(10):
        reader = _Reader(f"sha256:{n:064x}", 7, recent)
        files.append(MetadataFile(f"m-{n}.safetensors", reader, 0, 7 * MiB))  # type: ignore[arg-type]

        async def read(offset: int, size: int, n: int = n) -> bytes:
            return struct.pack("<Q", header)[offset:offset + size] if offset < 8 else b" " * size
        files[-1].read = read  # type: ignore[method-assign]
    result = await fetch_metadata(files, metadata.Metadata())
    assert result.state == "ready" and result.files == 10
    pinned = sum(len(recent.indexes(f.reader.digest)) for f in files)
    assert pinned * MiB <= 8 * MiB, f"{pinned} MiB pinned, bound 8"


class _DataReader(_Reader):
    """A blob holding ``data``, whose blocks are all servable; records what is read at once."""

    def __init__(self, digest: str, data: bytes, recent: RecentBlocks) -> None:
        super().__init__(digest, -(-len(data) // MiB), recent)
        self.data = data
        self.spans: list[int] = []

    def block_length(self, index: int) -> int:
        return min(MiB, len(self.data) - index * MiB)

    async def blocks(self, first: int, last: int) -> list[memoryview]:
        self.spans.append(last - first + 1)
        await trio.lowlevel.checkpoint()
        return [memoryview(self.data[i * MiB:(i + 1) * MiB]) for i in range(first, last + 1)]


async def test_a_big_safetensors_header_is_fetched_and_pinned_never_joined_whole():
    """The pass only fetches and pins a safetensors JSON header (up to 100 MB); it read it
    into memory whole (the blocks joined, then sliced: twice its size a file, every file of
    the model at once)."""
    recent = RecentBlocks(capacity=4)
    header = 6 * MiB - 8
    data = struct.pack("<Q", header) + b" " * header + b"\0" * MiB
    reader = _DataReader("sha256:" + "a" * 64, data, recent)
    file = MetadataFile("model.safetensors", reader, 0, len(data))  # type: ignore[arg-type]
    result = await fetch_metadata([file], metadata.Metadata())
    assert result.state == "ready" and result.bytes == 6 * MiB
    assert sorted(recent.indexes(reader.digest)) == list(range(6))
    assert max(reader.spans) == 1, reader.spans


async def test_indexes_are_parsed_within_a_bound_and_kept_as_their_shard_order(monkeypatch):
    """A model of many big ``*.index.json`` (each up to 16 MiB, 1,024 files read ahead): each
    was parsed and kept whole for the mount's life (a 9 MB index is some 100 MB of Python
    objects). Now at most INDEX_BYTES_MAX are parsed, and of each only its shards' order kept."""
    monkeypatch.setattr(metadata, "INDEX_BYTES_MAX", 250_000, raising=False)
    recent = RecentBlocks(capacity=4)
    files = []
    for n in range(10):
        weight_map = {f"layer.{i}.weight": f"model-{i % 3:05d}.safetensors" for i in range(2500)}
        data = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
        reader = _DataReader(f"sha256:{n:064x}", data, recent)
        files.append(MetadataFile(f"m{n}/model.safetensors.index.json", reader, 0, len(data)))  # type: ignore[arg-type]
    assert 90_000 < len(data) < 125_000
    result = await fetch_metadata(files, metadata.Metadata())
    assert result.state == "ready" and result.files == 10
    assert len(result.indexes) == 2
    assert all(parsed == {"weight_map": {f"model-{i:05d}.safetensors": f"model-{i:05d}.safetensors" for i in range(3)}}
               for _, parsed in result.indexes)
    where = result.indexes[0][0].split("/")[0]
    assert shard_order(result.indexes[:1]) == [f"{where}/model-{i:05d}.safetensors" for i in range(3)]
