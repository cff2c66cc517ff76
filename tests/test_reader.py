"""The reader and its sources against the in-process fake registry (``modelfs.testing``): no
FUSE, no registry process, a real block cache in a temporary directory, trio's MockClock for
timeouts and backoff. Every trust mode against every source, single flight, a worker that
dies or stalls mid-range, bytes flipped on the way, and blocks another process stored under
a trust of its own.

Blocks are 4 KiB and blobs 16 blocks, so each test runs in milliseconds; the same paths at
full size, through FUSE and a real registry, are in test_integrity, test_faults and
test_rangefetch."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from trio.testing import MockClock

from modelfs.errors import FetchError
from modelfs.formats.blockindex import ALGORITHMS, TrustedIndex
from modelfs.formats.spec import Descriptor, Packing
from modelfs.mount.blobreader import BlobReader
from modelfs.mount.fetcher import Fetcher, FetchPolicy
from modelfs.mount.layerstream import LayerStream
from modelfs.mount.trust import Mode
from modelfs.registry import RetryPolicy
from modelfs.storage.cache import BlockCache
from modelfs.testing.registry import FakeRegistry, digest_of
from modelfs.testing.registry import index_of as block_index_of

BS = 4096
NBLOCKS = 16
BLAKE3 = ALGORITHMS["blake3"]
REPOSITORY = "org/model"


@pytest.fixture
def clock() -> MockClock:
    """Virtual time: a backoff or a deadline passes as soon as nothing else can run. The
    threshold leaves worker threads (receiving, hashing, storing) time to report back before
    the clock jumps past them: at 0.05 s a loaded machine (the whole suite beside other work)
    now and then let the clock jump past a worker still hashing, and a stall test saw its
    deadline pass early; at 0.1 s the file takes 6 s instead of 3."""
    return MockClock(autojump_threshold=0.1)


@pytest.fixture
def fake() -> FakeRegistry:
    return FakeRegistry()


def blob(blocks: int = NBLOCKS, tail: int = 123) -> bytes:
    return os.urandom(blocks * BS - (BS - tail if tail else 0))


def index_of(*blobs: bytes, vouched: bool = True) -> TrustedIndex:
    return block_index_of(*blobs, block_size=BS, vouched=vouched)


@asynccontextmanager
async def data_path(root, fake: FakeRegistry, verify: str = "full", index: TrustedIndex | None = None,
                    wait: float = 30.0, stall: float | None = None, attempts: int = 3, backoff: float = 0.5
                    ) -> AsyncIterator[Fetcher]:
    """One mount's data path over the fake, its fetch tasks in a nursery closed at the end
    (``wait``: the read deadline; ``stall``: the stall window)."""
    cache = BlockCache(str(root), block_size=BS)
    policy = FetchPolicy(timeout=wait, stall_timeout=stall, workers=2, verify=verify,
                         retry=RetryPolicy(attempts=attempts, base_delay=backoff, max_delay=4 * backoff))
    async with trio.open_nursery() as nursery:
        fetcher = Fetcher(cache, fake, REPOSITORY, nursery, policy, index=index, range_reader=fake)
        try:
            yield fetcher
        finally:
            nursery.cancel_scope.cancel()
    fetcher.close()
    cache.close()


async def quiet(*readers: BlobReader) -> None:
    """Until no fetch or check of ``readers`` is under way (a lazy layer's pass goes on after
    the blocks a reader waited for were served)."""
    while any(reader.busy for reader in readers):  # noqa: ASYNC110 - no event says it; polled in virtual time
        await trio.sleep(0.01)


def tar_gzip(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return gzip.compress(out.getvalue(), compresslevel=1)


def layer_file(fetcher: Fetcher, layer: bytes, path: str, size: int) -> tuple[LayerStream, BlobReader]:
    descriptor = Descriptor("application/vnd.cncf.model.weight.v1.tar+gzip", digest_of(layer), len(layer))
    stream = fetcher.layer_stream(descriptor, Packing.TAR_GZIP, "layer")
    return stream, stream.target(path, size)


# -- every trust mode x every source ------------------------------------------------------

RANGE_CASES = [("index", "runs"), ("lazy", "runs"), ("whole", "whole pass")]


@pytest.mark.parametrize(("mode", "source"), RANGE_CASES)
async def test_each_trust_mode_serves_a_blob_read_by_ranges_fetching_each_byte_once(clock, tmp_path, fake, mode, source):
    data = blob()
    digest = fake.add_blob(data)
    index = index_of(data) if mode == "index" else None
    async with data_path(tmp_path, fake, verify="lazy" if mode == "lazy" else "full", index=index) as fetcher:
        reader = fetcher.reader(digest, len(data))
        assert reader.trust.mode is Mode(mode)
        assert await reader.read(0, len(data)) == data
        assert await reader.verified()
        assert await reader.read(5 * BS + 7, 3 * BS) == data[5 * BS + 7:8 * BS + 7]  # from the cache now
    assert fake.bytes_sent == len(data) and fake.streams == 0
    assert fetcher.stats.integrity_errors == 0 and fetcher.stats.retries == 0


@pytest.mark.parametrize("mode", ["whole", "lazy"])
async def test_each_trust_mode_serves_a_file_of_a_compressed_layer_streamed_once(clock, tmp_path, fake, mode):
    files = {"a.bin": blob(3), "w.bin": blob(9, tail=77)}
    layer = tar_gzip(files)
    fake.add_blob(layer)
    async with data_path(tmp_path, fake, verify="lazy" if mode == "lazy" else "full") as fetcher:
        stream, reader = layer_file(fetcher, layer, "w.bin", len(files["w.bin"]))
        other = stream.target("a.bin", len(files["a.bin"]))
        assert reader.trust.mode is Mode(mode)
        assert await reader.read(0, len(files["w.bin"])) == files["w.bin"]
        assert await other.read(0, len(files["a.bin"])) == files["a.bin"]  # filled by the same pass
        await quiet(reader, other)
        assert await reader.verified() and await other.verified()
    assert fake.streams == 1 and fake.bytes_sent == len(layer) and fake.ranges == []


async def test_a_compressed_layer_held_checked_against_the_index_streams_from_the_cache(clock, tmp_path, fake):
    """Index mode, layer stream: ``pull`` stored the compressed blob, every block matched the
    index; a mount then streams the layer from the cache, nothing from the registry."""
    files = {"w.bin": blob(5)}
    layer = tar_gzip(files)
    digest = fake.add_blob(layer)
    async with data_path(tmp_path, fake, index=index_of(layer)) as fetcher:
        assert await fetcher.reader(digest, len(layer)).settle()
        sent = fake.bytes_sent
        _, reader = layer_file(fetcher, layer, "w.bin", len(files["w.bin"]))
        assert await reader.read(0, len(files["w.bin"])) == files["w.bin"]
    assert fake.streams == 0 and fake.bytes_sent == sent == len(layer)


# -- bytes flipped on the way ---------------------------------------------------------------


@pytest.mark.parametrize(("mode", "source"), RANGE_CASES)
async def test_a_flipped_byte_is_caught_in_each_trust_mode_and_fetched_again(clock, tmp_path, fake, mode, source):
    data = blob()
    digest = fake.add_blob(data)
    fake.faults.flip(nth=1, at=2 * BS + 5)
    dropped: list[str] = []
    index = index_of(data) if mode == "index" else None
    async with data_path(tmp_path, fake, verify="lazy" if mode == "lazy" else "full", index=index) as fetcher:

        async def stale(key: str) -> None:
            dropped.append(key)

        fetcher.on_dropped.append(stale)
        reader = fetcher.reader(digest, len(data))
        first = await reader.read(0, len(data))
        if mode == "lazy":  # served unchecked; the blob then fails its digest whole and leaves by the one path
            assert first != data
            assert not await reader.verified()
            await trio.sleep(0.1)
            assert dropped == [digest]
            first = await reader.read(0, len(data))
        assert first == data
        assert await reader.verified()
    assert fetcher.stats.integrity_errors == 1
    assert len(fake.ranges_of(digest)) >= 2


async def test_a_flipped_byte_in_a_compressed_layer_fails_the_pass_and_the_layer_is_streamed_again(clock, tmp_path, fake):
    files = {"w.bin": blob(6)}
    layer = tar_gzip(files)
    fake.add_blob(layer)
    fake.faults.flip_stream(nth=1, at=len(layer) // 2)
    async with data_path(tmp_path, fake) as fetcher:
        _, reader = layer_file(fetcher, layer, "w.bin", len(files["w.bin"]))
        assert await reader.read(0, len(files["w.bin"])) == files["w.bin"]
    assert fake.streams == 2


# -- single flight ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["index", "whole"])
async def test_concurrent_readers_of_one_block_share_one_fetch(clock, tmp_path, fake, mode):
    data = blob()
    digest = fake.add_blob(data)
    got: list[bytes] = []
    async with data_path(tmp_path, fake, index=index_of(data) if mode == "index" else None) as fetcher:
        reader = fetcher.reader(digest, len(data))

        async def read_block_five() -> None:
            got.append(await reader.read(5 * BS, BS))

        async with trio.open_nursery() as readers:
            for _ in range(8):
                readers.start_soon(read_block_five)
    assert got == [data[5 * BS:6 * BS]] * 8
    assert len([asked for asked in fake.ranges_of(digest) if asked.covers(5 * BS)]) == 1


# -- a worker that dies, stalls or is refused -------------------------------------------------


@pytest.mark.parametrize("fault", ["cut", "kill_worker"])
async def test_a_range_that_dies_mid_body_resumes_after_its_last_delivered_block(clock, tmp_path, fake, fault):
    data = blob()
    digest = fake.add_blob(data)
    getattr(fake.faults, fault)(nth=1, after_blocks=3)
    async with data_path(tmp_path, fake, index=index_of(data)) as fetcher:
        reader = fetcher.reader(digest, len(data))
        await fetcher.prefetch([reader])
        assert await reader.read(0, len(data)) == data
    starts = [asked.start for asked in fake.ranges_of(digest)]
    assert starts == [0, 3 * BS]
    # nothing delivered was fetched twice (a killed worker had received the block it died on)
    assert fake.bytes_sent == len(data) + (BS if fault == "kill_worker" else 0)
    assert fetcher.stats.retries == 1


@pytest.mark.parametrize("mode", ["index", "whole"])
async def test_a_stalled_range_is_aborted_after_the_stall_window_and_the_read_still_succeeds(clock, tmp_path, fake, mode):
    """The stall window (10 s) below the read deadline (30 s): the watchdog aborts the range
    that stalled after two blocks, another resumes after them, and the read that waited gets
    its bytes; all in virtual time."""
    data = blob()
    digest = fake.add_blob(data)
    fake.faults.stall(nth=1, after_blocks=2)
    index = index_of(data) if mode == "index" else None
    async with data_path(tmp_path, fake, index=index, wait=30, stall=10) as fetcher:
        reader = fetcher.reader(digest, len(data))
        started = trio.current_time()
        assert await reader.read(0, len(data)) == data
        assert 10 <= trio.current_time() - started < 30
    assert fake.faults.aborted == 1
    assert [asked.start for asked in fake.ranges_of(digest)] == [0, 2 * BS]
    assert fake.bytes_sent == len(data)


async def test_with_one_timeout_for_both_a_stalled_range_fails_the_read_then_is_retried(clock, tmp_path, fake):
    """``--timeout`` alone is both the read deadline and the stall window, as before they had
    names: the read that waited fails with EIO; the range is retried and the next read served."""
    data = blob()
    digest = fake.add_blob(data)
    fake.faults.stall(nth=1, after_blocks=2)
    async with data_path(tmp_path, fake, index=index_of(data), wait=10) as fetcher:
        reader = fetcher.reader(digest, len(data))
        with pytest.raises(FetchError, match="timed out after 10s"):
            await reader.read(0, len(data))
        await trio.sleep(5)
        assert await reader.read(0, len(data)) == data
    assert fake.faults.aborted == 1


@pytest.mark.parametrize("stall", [None, 10.0])
async def test_a_stalled_compressed_stream_is_given_up_and_streamed_again(clock, tmp_path, fake, stall):
    files = {"w.bin": blob(6)}
    layer = tar_gzip(files)
    fake.add_blob(layer)
    fake.faults.stall_stream(nth=1, after=len(layer) // 3)
    async with data_path(tmp_path, fake, wait=20, stall=stall) as fetcher:
        _, reader = layer_file(fetcher, layer, "w.bin", len(files["w.bin"]))
        started = trio.current_time()
        if stall is None:  # one timeout for both: the reader's deadline passes with the stream's guard
            with pytest.raises(FetchError, match="no progress"):
                await reader.read(0, len(files["w.bin"]))
            await trio.sleep(1)
        assert await reader.read(0, len(files["w.bin"])) == files["w.bin"]
        assert (stall or 20) <= trio.current_time() - started < 40
    assert fake.streams == 2


@pytest.mark.parametrize("answer", ["answer_whole", "answer_other_range", "fail"])
async def test_a_range_answered_wrongly_is_read_right_or_fetched_again(clock, tmp_path, fake, answer):
    data = blob()
    digest = fake.add_blob(data)
    getattr(fake.faults, answer)(nth=1)
    async with data_path(tmp_path, fake, index=index_of(data)) as fetcher:
        reader = fetcher.reader(digest, len(data))
        assert await reader.read(5 * BS, BS) == data[5 * BS:6 * BS]
    if answer == "answer_whole":  # a 200 with the whole blob: read past the bytes before the range
        assert fetcher.stats.retries == 0 and fake.bytes_sent == 6 * BS
    else:
        assert fetcher.stats.retries == 1 and len(fake.ranges_of(digest)) == 2


async def test_a_range_refused_every_time_fails_its_read_after_the_policys_attempts(clock, tmp_path, fake):
    data = blob()
    digest = fake.add_blob(data)
    fake.faults.fail(nth=None, status=503)
    async with data_path(tmp_path, fake, index=index_of(data), attempts=3) as fetcher:
        reader = fetcher.reader(digest, len(data))
        with pytest.raises(FetchError, match="503"):
            await reader.read(5 * BS, BS)
    assert len(fake.ranges_of(digest)) == 3
    assert fetcher.stats.errors == 1


# -- blocks another process stored under a trust of its own ----------------------------------


@pytest.mark.parametrize("theirs", ["equal", "different"])
async def test_a_cached_block_stored_without_this_index_is_hashed_and_adopted_or_replaced(clock, tmp_path, fake, theirs):
    data = blob()
    digest = fake.add_blob(data)
    block = data[3 * BS:4 * BS]
    peer = BlockCache(str(tmp_path), block_size=BS).entry(digest, len(data))  # another process, a lazy mount
    peer.write_block(3, block if theirs == "equal" else os.urandom(BS))
    index = index_of(data)
    async with data_path(tmp_path, fake, index=index) as fetcher:
        reader = fetcher.reader(digest, len(data))
        assert await reader.read(3 * BS, BS) == block
    expected = index.index.blobs[digest][3]
    assert fetcher.cache.entry(digest, len(data)).trusted(3, expected)
    if theirs == "equal":
        assert fake.ranges == [] and fetcher.stats.integrity_errors == 0
    else:
        assert len(fake.ranges) == 1 and fetcher.stats.integrity_errors == 1


@pytest.mark.parametrize("theirs", ["equal", "different"])
async def test_a_block_another_process_stores_while_ours_is_on_the_way_is_adopted_or_replaced(clock, tmp_path, fake, theirs):
    data = blob()
    digest = fake.add_blob(data)
    block = data[3 * BS:4 * BS]
    peer = BlockCache(str(tmp_path), block_size=BS).entry(digest, len(data))

    def peer_stores(asked: str, start: int, end: int) -> None:  # on the worker thread, before our body
        peer.write_block(3, block if theirs == "equal" else os.urandom(BS))

    fake.faults.before_body = peer_stores
    index = index_of(data)
    async with data_path(tmp_path, fake, index=index) as fetcher:
        reader = fetcher.reader(digest, len(data))
        assert await reader.read(3 * BS, BS) == block
        entry = fetcher.cache.entry(digest, len(data))
        assert entry.trusted(3, index.index.blobs[digest][3])
        assert entry.read_block(3) == block  # what is on disk under a delivered block is what was checked


# -- what is retried: declared per error class ----------------------------------------------


def test_retryable_errors_are_declared_by_their_class():
    from modelfs.errors import (
        AuthenticationError,
        CacheError,
        ConnectionLostError,
        DamagedStreamError,
        IntegrityError,
        ManifestError,
        NotFoundError,
        RegistryError,
        TLSError,
        permanent,
    )
    from modelfs.registry.ranges import LocationRejected, RangeRefused, TransferAborted, WrongRange
    for cured in (IntegrityError, ConnectionLostError, TransferAborted, LocationRejected, RangeRefused, WrongRange,
                  DamagedStreamError, FetchError):
        assert not permanent(cured("x")), cured
    for refused in (AuthenticationError, NotFoundError, TLSError, CacheError, ManifestError, RegistryError):
        assert permanent(refused("x")), refused
    assert not permanent(OSError("reset")) and not permanent(RuntimeError("a worker died"))


async def test_a_blob_the_registry_does_not_have_fails_its_read_at_once(clock, tmp_path, fake):
    data = blob()
    digest = digest_of(data)  # never added
    async with data_path(tmp_path, fake, index=index_of(data), attempts=5) as fetcher:
        reader = fetcher.reader(digest, len(data))
        with pytest.raises(FetchError, match="not found"):
            await reader.read(0, BS)
    assert fetcher.stats.retries == 0 and len([asked for asked in fake.ranges if asked.covers(0)]) == 1


async def test_a_range_its_location_refuses_is_located_again_and_read(clock, tmp_path, fake):
    data = blob()
    digest = fake.add_blob(data)
    fake.faults.fail(nth=1, status=403)  # an expired token or presigned URL
    async with data_path(tmp_path, fake, index=index_of(data)) as fetcher:
        reader = fetcher.reader(digest, len(data))
        assert await reader.read(5 * BS, BS) == data[5 * BS:6 * BS]
    assert fake.probes == 1 and fetcher.stats.retries == 1
