"""Block buffers are used again only when nothing can still see their bytes."""

from __future__ import annotations

import ctypes

from modelfs.mount.buffers import BlockBuffers
from modelfs.storage.direct import DIRECT_ALIGNMENT

MiB = 1 << 20


def address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_buffers_are_page_aligned_and_reused_once_given_back():
    buffers = BlockBuffers(MiB)
    first = buffers.take(MiB)
    assert len(first) == MiB and address(first) % DIRECT_ALIGNMENT == 0
    where = address(first)
    buffers.give_back(first)
    again = buffers.take(MiB)
    assert address(again) == where and buffers.reused == 1


def test_a_buffer_a_reader_still_holds_a_view_of_is_never_reused():
    buffers = BlockBuffers(MiB)
    block = buffers.take(MiB)
    block[:5] = b"hello"
    served = block[:5]  # what a FUSE reply or a reader may still hold
    buffers.give_back(block)
    other = buffers.take(MiB)
    other[:5] = b"XXXXX"
    assert bytes(served) == b"hello"  # untouched: it was not handed out again
    assert buffers.reused == 0


def test_a_short_last_block_gets_a_buffer_of_its_own():
    buffers = BlockBuffers(MiB)
    tail = buffers.take(12345)
    assert len(tail) == 12345 and address(tail) % DIRECT_ALIGNMENT == 0
    buffers.give_back(tail)
    assert buffers.take(MiB) is not tail and buffers.reused == 0


def test_the_free_list_is_bounded():
    buffers = BlockBuffers(MiB, keep=2)
    views = [buffers.take(MiB) for _ in range(5)]
    for view in views:
        buffers.give_back(view)
    assert len(buffers._free) == 2


def test_things_that_are_not_pool_buffers_are_ignored():
    buffers = BlockBuffers(MiB)
    buffers.give_back(b"bytes from a layer stream")
    buffers.give_back(memoryview(bytearray(MiB)))
    assert buffers._free == []
