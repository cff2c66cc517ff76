"""The data path's pure decisions: read-ahead, runs, request sizes."""

from __future__ import annotations

from modelfs.mount.readahead import ReadAhead, RequestSizer, Streams, plan_runs

MiB = 1 << 20


def test_sequential_reader_gets_a_window_that_doubles_up_to_the_cap():
    ahead = ReadAhead(MiB, nblocks=1000, max_blocks=16)
    asked = []
    for block in range(40):
        asked.append(list(ahead.after_read(block * MiB, MiB)))
    assert asked[0] == [1]  # the first read: one block ahead
    assert ahead.window == 16  # capped
    fetched = sorted(i for run in asked for i in run)
    assert fetched == list(range(1, fetched[-1] + 1))  # every block ahead asked once, no gaps, no repeats
    assert fetched[-1] >= 40 + 8 - 1  # at least half a window ahead of the reader at the end


def test_read_ahead_refills_in_batches_not_block_by_block():
    ahead = ReadAhead(MiB, nblocks=1000, max_blocks=32)
    batches = [list(ahead.after_read(block * MiB, MiB)) for block in range(200)]
    nonempty = [batch for batch in batches if batch]
    assert len(nonempty) < 30  # 200 reads, a few large requests
    assert max(len(batch) for batch in nonempty) >= 16


def test_random_access_turns_read_ahead_off_and_sequential_turns_it_back_on():
    ahead = ReadAhead(MiB, nblocks=1000, max_blocks=32)
    for block in range(10):
        ahead.after_read(block * MiB, MiB)
    assert not ahead.after_read(500 * MiB, 4096)  # a jump: nothing ahead
    assert ahead.window == 0
    assert not ahead.after_read(123 * MiB, 4096)
    assert list(ahead.after_read(123 * MiB + 4096, MiB)) == [125]  # sequential again: one block past the read


def test_read_ahead_stops_at_the_end_of_the_blob():
    ahead = ReadAhead(MiB, nblocks=5, max_blocks=32)
    asked = [i for block in range(5) for i in ahead.after_read(block * MiB, MiB)]
    assert asked == [1, 2, 3, 4]


def test_small_reads_inside_one_block_ask_nothing_new():
    ahead = ReadAhead(MiB, nblocks=100, max_blocks=32)
    ahead.after_read(0, 4096)
    assert [list(ahead.after_read(off, 4096)) for off in range(4096, MiB - 4096, 4096)] == [[]] * 254
    assert list(ahead.after_read(MiB - 4096, 4096)) == [2]  # the reader reached the block's end: on ahead


def test_plan_runs_cuts_contiguous_blocks_at_gaps_and_at_the_run_size():
    assert plan_runs([], 4) == []
    assert plan_runs([7], 4) == [(7, 7)]
    assert plan_runs([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 4) == [(0, 3), (4, 7), (8, 9)]
    assert plan_runs([1, 2, 5, 6, 7, 20], 8) == [(1, 2), (5, 7), (20, 20)]
    assert plan_runs([3, 2, 1], 8) == [(3, 3), (2, 2), (1, 1)]  # in the order asked, never reordered


def test_sizer_starts_with_one_request_per_worker():
    sizer = RequestSizer(MiB, workers=2)
    assert sizer.parallel == 2 and sizer.run_blocks == 16


def test_sizer_asks_fast_links_for_few_large_requests():
    sizer = RequestSizer(MiB, workers=2)
    for _ in range(5):
        sizer.record(32 * MiB, 0.05)  # 670 MB/s per connection
    assert sizer.parallel == 2
    assert sizer.run_blocks == 32  # the largest the window allows per slot
    assert sizer.window_blocks <= sizer.window_cap


def test_sizer_spreads_a_rate_limited_link_over_more_connections():
    sizer = RequestSizer(MiB, workers=2)
    for _ in range(5):
        sizer.record(16 * MiB, 16 * MiB / 50e6)  # 50 MB/s per connection, like the slow-link benchmark
    assert sizer.parallel == 8
    assert 4 <= sizer.run_blocks <= 24  # about half a second on the connection
    assert sizer.parallel * sizer.run_blocks <= sizer.window_cap + sizer.parallel * sizer.min_run


def test_sizer_keeps_the_window_bounded_however_many_workers():
    sizer = RequestSizer(MiB, workers=64, window_cap=96)
    sizer.record(32 * MiB, 0.01)
    assert sizer.run_blocks == sizer.min_run  # many slots share the window: small runs
    assert sizer.window_blocks <= 96


def test_sizer_ignores_requests_too_small_to_measure():
    sizer = RequestSizer(MiB, workers=2)
    sizer.record(4096, 0.5)
    sizer.record(MiB, 0.0)
    assert sizer.rate is None


def _interleaved(streams: Streams, readers: int, reads_each: int, read_blocks: int) -> list[list[int]]:
    """``readers`` threads, each reading its own part of the blob in order, their reads
    interleaved one by one (Run:ai's streamer: 16 threads, 8 MiB reads): what each asked ahead."""
    part = reads_each * read_blocks
    asked: list[list[int]] = [[] for _ in range(readers)]
    for step in range(reads_each):
        for reader in range(readers):
            offset = (reader * part + step * read_blocks) * MiB
            asked[reader] += list(streams.after_read(offset, read_blocks * MiB))
    return asked


def test_interleaved_readers_each_keep_a_growing_window():
    streams = Streams(MiB, nblocks=16 * 64, max_blocks=64)
    asked = _interleaved(streams, readers=16, reads_each=8, read_blocks=8)
    for reader, blocks in enumerate(asked):
        start = reader * 64
        # every reader's blocks ahead are asked once, in order, from its second read on (its
        # first one starts the stream), reaching the end of its part
        assert blocks == list(range(blocks[0], blocks[-1] + 1)) and blocks[0] <= start + 16
        assert blocks[-1] >= start + 63 or blocks[-1] == 16 * 64 - 1
    assert len(streams.streams) == 16 and all(s.window for s in streams.streams)


def test_one_read_ahead_per_blob_switches_off_for_interleaved_readers():
    """What the per-blob state did (the old ReadAhead over the same reads): nothing ahead."""
    ahead = ReadAhead(MiB, nblocks=16 * 64, max_blocks=64)
    asked = [i for step in range(8) for reader in range(16)
             for i in ahead.after_read((reader * 64 + step * 8) * MiB, 8 * MiB)]
    assert len(asked) < 16 * 8


def test_interleaved_readers_ask_in_requests_as_large_as_one_readers():
    """16 streams share the budget, but each still asks in batches of at least half of
    ``min_blocks``: few requests, not slivers (adjacent streams' runs are not cut small)."""
    streams = Streams(MiB, nblocks=16 * 128, max_blocks=64, min_blocks=32)
    batches = []
    for step in range(16):
        for reader in range(16):
            got = streams.after_read((reader * 128 + step * 8) * MiB, 8 * MiB)
            if got:
                batches.append(len(got))
    assert max(s.window for s in streams.streams) == 32  # each stream grew to a full request
    large = [b for b in batches if b >= 16]
    assert sum(large) >= 0.7 * sum(batches)  # most blocks asked in batches of 16 or more
    one = Streams(MiB, nblocks=16 * 128, max_blocks=64, min_blocks=32)
    alone = [len(got) for block in range(0, 16 * 128, 8) if (got := one.after_read(block * MiB, 8 * MiB))]
    assert len(batches) <= 16 * 6 + 2 * len(alone)  # the start of each stream, then as one reader


def test_a_stream_that_goes_random_leaves_the_others_alone():
    streams = Streams(MiB, nblocks=1000, max_blocks=32)
    for block in range(10):
        streams.after_read(block * MiB, MiB)
    assert not streams.after_read(700 * MiB, 4096)  # a jump starts a new stream: nothing ahead yet
    assert streams.after_read(10 * MiB, MiB) or streams.window  # the first stream kept its window
    assert streams.window >= 8


def test_streams_are_bounded_least_recently_used_out():
    streams = Streams(MiB, nblocks=100_000, max_blocks=32, max_streams=4)
    for reader in range(10):
        streams.after_read(reader * 1000 * MiB, 4096)
    assert len(streams.streams) == 4
    assert [s.sequential_end // MiB for s in streams.streams] == [6000, 7000, 8000, 9000]


def test_a_block_is_expected_between_a_streams_position_and_the_end_of_its_window():
    """What prefetch brings just ahead of a reader is kept in memory for it (the reader would
    read it back from disk a moment later); what nobody reads next is not."""
    streams = Streams(MiB, nblocks=1000, max_blocks=16)
    assert not streams.expects(0)  # nobody reads yet
    for block in range(10):
        streams.after_read(block * MiB, MiB)
    window = streams.window
    assert window >= 8
    assert streams.expects(10) and streams.expects(10 + window - 1)
    assert not streams.expects(5)  # behind the reader
    assert not streams.expects(10 + 2 * window)  # far past what it asked for
    streams.after_read(700 * MiB, 4096)  # a random read: a stream with no window expects nothing
    assert not streams.expects(701)
