"""Prefetch in the order loaders read, metadata first (issue 23).

The policy: the queue a reader's file jumps, the slots reads take first, the order, the GGUF
header parse, and prefetch over the in-process fake registry. At a real mount, through the
real registry: test_prefetch_mount.py.
"""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
import trio

from modelfs.mount import slots as slots_module
from modelfs.mount.context import ForegroundGate
from modelfs.mount.fetcher import Fetcher, FetchPolicy
from modelfs.mount.metadata import gguf_header_length, kind
from modelfs.mount.prefetch import PrefetchQueue, prefetch_order, shard_order
from modelfs.mount.slots import RequestSlots
from modelfs.storage.cache import BlockCache
from modelfs.testing.registry import FakeRegistry, index_of

MiB = 1 << 20


class _Reader:
    def __init__(self, digest: str, nblocks: int) -> None:
        self.digest, self.nblocks, self.size = digest, nblocks, nblocks * MiB
        self.whole_mode = False
        self.flights = self
        self.done: set[int] = set()

    def servable(self, index: int) -> bool:
        return index in self.done

    def in_flight(self, index: int) -> bool:
        return False

    def block_length(self, index: int) -> int:
        return MiB


class _Ctx:
    def __init__(self) -> None:
        self.gate = ForegroundGate()


def test_a_file_being_read_jumps_the_prefetch_queue():
    ctx = _Ctx()
    a, b, c = _Reader("a", 40), _Reader("b", 40), _Reader("c", 40)
    queue = PrefetchQueue(ctx, [a, b, c])  # type: ignore[arg-type]
    assert queue.next(16) == (a, list(range(16)))
    ctx.gate.reading("c", 20)  # a process reads c at block 20: prefetch goes there, from there on
    assert queue.next(16) == (c, list(range(20, 36)))
    assert queue.next(16) == (c, list(range(36, 40)))
    assert queue.next(16) == (c, list(range(0, 16)))  # then what it skipped of c
    ctx.gate.reading("b", 0)
    b.done.update(range(8))  # read meanwhile: not fetched again
    assert queue.next(16) == (b, list(range(8, 24)))


def test_prefetch_order_takes_the_shards_an_index_names_by_name():
    class R:
        def __init__(self, digest: str, size: int) -> None:
            self.digest, self.size = digest, size

    # save_pretrained sorts the weight_map by tensor name: lm_head (in the last shard) first;
    # loaders read the shards by name (m-2 before m-10)
    shards = shard_order([("sub/model.safetensors.index.json",
                           {"weight_map": {"lm_head": "m-10.safetensors", "x": "m-2.safetensors",
                                           "y": "m-1.safetensors", "z": "m-2.safetensors"}})])
    assert shards == ["sub/m-1.safetensors", "sub/m-2.safetensors", "sub/m-10.safetensors"]
    files = [("sub/m-1.safetensors", R("1", 900 * MiB)), ("sub/m-2.safetensors", R("2", 1000 * MiB)),
             ("sub/m-10.safetensors", R("10", 10 * MiB)), ("sub/config.json", R("c", 10)), ("b.bin", R("b", 40 * MiB)),
             ("a.bin", R("a", 50 * MiB))]
    assert [r.digest for r in prefetch_order(files, shards)] == ["c", "1", "2", "10", "a", "b"]
    # shards no index names (vLLM globs *.safetensors): by name, digits as numbers
    files = [("w/m-10.safetensors", R("10", 900 * MiB)), ("w/m-9.safetensors", R("9", 900 * MiB))]
    assert [r.digest for r in prefetch_order(files)] == ["9", "10"]


async def test_reads_take_a_freed_request_slot_before_prefetch():
    slots = RequestSlots(1)
    order: list[str] = []

    async def take(name: str, foreground: bool) -> None:
        async with slots.held(foreground):
            order.append(name)
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        await slots.acquire(False)  # a prefetch run on the wire
        nursery.start_soon(take, "prefetch", False)
        await trio.sleep(0.001)
        nursery.start_soon(take, "read", True)
        await trio.sleep(0.001)
        slots.release(False)
    assert order == ["read", "prefetch"]
    assert slots.in_use == slots.background == 0


async def test_a_read_overdraws_only_slots_background_runs_hold(monkeypatch):
    """Past OVERDRAFT_AFTER a waiting read takes a slot beyond the total when prefetch holds
    them, never when reads do: reads alone stay within the total."""
    monkeypatch.setattr(slots_module, "OVERDRAFT_AFTER", 0.05)
    slots = RequestSlots(1)
    await slots.acquire(True)  # a read's run on the wire
    with trio.move_on_after(0.3) as waited:
        await slots.acquire(True)
    assert waited.cancelled_caught and slots.in_use == 1
    slots.release(True)
    await slots.acquire(False)  # a prefetch run on the wire, stalled
    with trio.fail_after(1):
        await slots.acquire(True)
    assert slots.in_use == 2 and slots.background == 1
    slots.release(True)
    slots.release(False)
    assert slots.in_use == slots.background == 0


def _gguf(pairs: int, tensors: int) -> bytes:
    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    out = b"GGUF" + struct.pack("<IQQ", 3, tensors, pairs)
    for i in range(pairs):  # a string, a u32, an array of strings
        kind_, value = [(8, string("llama")), (4, struct.pack("<I", 7)),
                        (9, struct.pack("<IQ", 8, 3) + string("a") + string("bb") + string("ccc"))][i % 3]
        out += string(f"key.{i}") + struct.pack("<I", kind_) + value
    for i in range(tensors):
        out += string(f"blk.{i}.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 64, 32) + struct.pack("<IQ", 0, i * 2048)
    return out


async def test_gguf_header_ends_after_the_tensor_infos_read_in_chunks():
    header = _gguf(3000, 500)
    data = header + b"\0" * 4096
    reads: list[tuple[int, int]] = []

    async def read(offset: int, size: int) -> bytes:
        reads.append((offset, size))
        return data[offset:offset + min(size, 1000)]  # short reads: the parse asks again

    assert await gguf_header_length(read, len(data)) == len(header)
    assert kind("m/x.gguf", len(data)) == "gguf" and kind("tokenizer_config.json", 10) == "whole"
    with pytest.raises(Exception, match="runs past"):
        await gguf_header_length(read, len(data), limit=1000)


async def test_prefetch_turns_to_the_blob_a_process_reads_and_hands_every_run_over_once(tmp_path):
    """In-process, over the fake registry, one request slot: a read of c while prefetch is on
    a puts c's runs ahead of b's; each run is handed to ``landed`` once it is in (pull reads
    it back there), every block exactly once."""
    bs = 64 << 10
    fake = FakeRegistry()
    blobs = [os.urandom(40 * bs) for _ in range(3)]
    a, b, c = (fake.add_blob(data) for data in blobs)
    index = index_of(*blobs, block_size=bs)
    cache = BlockCache(str(tmp_path), block_size=bs)
    landed: list[tuple[str, int]] = []

    async def land(reader, blocks: list[int]) -> None:
        landed.extend((reader.digest, i) for i in blocks)

    async with trio.open_nursery() as nursery:
        fetcher = Fetcher(cache, fake, "r", nursery, FetchPolicy(workers=1), index=index, range_reader=fake)
        readers = [fetcher.reader(digest, 40 * bs) for digest in (a, b, c)]
        done = trio.Event()

        async def run() -> None:
            await fetcher.prefetch(readers, landed=land)
            done.set()

        nursery.start_soon(run)
        with trio.fail_after(10):
            while not fake.ranges:  # noqa: ASYNC110 - the fake says nothing when a range starts
                await trio.sleep(0.001)
            assert await readers[2].read(20 * bs, 100) == blobs[2][20 * bs:20 * bs + 100]
            await done.wait()
        nursery.cancel_scope.cancel()
    fetcher.close()
    cache.close()
    first_seen = list(dict.fromkeys(asked.digest for asked in fake.ranges))
    assert first_seen == [a, c, b]
    prefetched = {digest: {i for d, i in landed if d == digest} for digest in (a, b, c)}
    assert len(landed) == sum(len(blocks) for blocks in prefetched.values())  # each block once
    assert prefetched[a] == prefetched[b] == set(range(40))
    assert set(range(40)) - prefetched[c] <= {20, 21}  # the read's block (and its read-ahead) came first


async def _read_beside_a_faulted_prefetch(tmp_path, fault: str, backing_off: float, **policy) -> float:
    """Seconds a read of blob b waits on one request slot while prefetch is on blob a, whose
    every range the fake registry answers with ``fault`` (``fail``: 503s; ``stall``)."""
    bs = 64 << 10
    fake = FakeRegistry()
    blobs = [os.urandom(8 * bs) for _ in range(2)]
    a, b = (fake.add_blob(data) for data in blobs)
    getattr(fake.faults, fault)(nth=None, digest=a)
    cache = BlockCache(str(tmp_path), block_size=bs)
    async with trio.open_nursery() as nursery:
        fetcher = Fetcher(cache, fake, "r", nursery, FetchPolicy(workers=1, prefetch_workers=1, **policy),
                          index=index_of(*blobs, block_size=bs), range_reader=fake)
        readers = [fetcher.reader(digest, 8 * bs) for digest in (a, b)]

        async def prefetch() -> None:
            with contextlib.suppress(Exception):  # it gives up on a in the end (a FetchError in a group)
                await fetcher.prefetch(readers[:1])

        nursery.start_soon(prefetch)
        with trio.fail_after(10):
            while not fake.ranges:  # noqa: ASYNC110 - the fake says nothing when a range starts
                await trio.sleep(0.001)
        await trio.sleep(backing_off)
        started = trio.current_time()
        with trio.fail_after(10):
            assert await readers[1].read(0, 100) == blobs[1][:100]
        waited = trio.current_time() - started
        nursery.cancel_scope.cancel()
    fetcher.close()
    cache.close()
    return waited


async def test_a_read_is_not_held_behind_prefetch_retrying_a_failing_blob(tmp_path):
    """One request slot (``--workers 1``), a registry failing every range of the blob prefetch
    is on (503s) and serving the others: prefetch's run held the slot through its whole
    retry schedule (0.2 + 0.4 + 0.8 + 1.6 + 3.2 s of backoff), so a read of another blob waited
    6 s, a --timeout below that an EIO. The slot is given up while the run backs off."""
    # prefetch's run failed once and backs off, in its slot
    waited = await _read_beside_a_faulted_prefetch(tmp_path, "fail", backing_off=0.05)
    assert waited < 0.3, f"the read waited {waited:.1f} s behind prefetch's retries"


async def test_a_read_is_not_held_behind_prefetch_runs_a_registry_stalls(tmp_path):
    """One request slot, a registry that stalls every range of the blob prefetch is on (the
    connection open, no bytes): prefetch's run held the slot for the whole stall window (the
    read timeout by default), so a read of another blob waited as long, and with it timed out
    (an EIO). A read waiting past :data:`~modelfs.mount.slots.OVERDRAFT_AFTER` on slots that
    background runs hold takes one past the total."""
    waited = await _read_beside_a_faulted_prefetch(tmp_path, "stall", backing_off=0, timeout=5)
    assert waited < 2, f"the read waited {waited:.1f} s behind a stalled prefetch run"
