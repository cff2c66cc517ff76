"""The map format on its own (modelfs/storage/mapformat.py): header and 48-byte entries
byte for byte, the flags, the lz4 policy, and the in-memory copy's counts. Pure: no files."""

from __future__ import annotations

import os
import struct

import pytest

from modelfs.storage.mapformat import (
    ABSENT,
    ENTRY,
    HEADER_SIZE,
    INDEXED,
    LZ4,
    POLICY_LZ4,
    POLICY_RAW,
    POLICY_UNDECIDED,
    PRESENT,
    WHOLE,
    BlockMap,
    Entry,
    Header,
    Undecodable,
    checksum,
    decode_block,
    encode_block,
    entry_offset,
    usage,
)

MiB = 1 << 20
TEXT = (b"the quick brown fox jumps over the lazy dog " * 30000)[:MiB]


def test_the_header_is_64_bytes_laid_out_as_maps_on_disk_already_are():
    header = Header.of(2 * MiB + 5, MiB, POLICY_LZ4)
    assert header.nblocks == 3 and header.map_size == 64 + 3 * 48
    raw = header.encode()
    assert len(raw) == HEADER_SIZE == 64
    assert raw == b"MFSMAP02" + struct.pack("<IQII", MiB, 2 * MiB + 5, 3, POLICY_LZ4) + bytes(36)
    assert Header.decode(raw + b"rest of the map") == header
    assert header.block_length(0) == MiB and header.block_length(2) == 5


def test_a_header_of_another_format_or_blob_is_told_apart():
    assert Header.decode(b"MFSMAP01" + Header.of(MiB, MiB).encode()[8:]) is None  # an older format
    assert Header.decode(b"MFSMAP02") is None  # torn
    assert Header.decode(b"") is None
    header = Header.of(3 * MiB, MiB)
    assert header.same_blob(Header.of(3 * MiB, MiB, POLICY_RAW))  # the policy is not the blob
    assert not header.same_blob(Header.of(3 * MiB + 1, MiB))
    assert not header.same_blob(Header.of(3 * MiB, MiB // 2))


def test_an_entry_is_48_bytes_and_its_flags_say_what_is_trusted():
    index_hash = os.urandom(32)
    entry = Entry(1234, PRESENT | LZ4 | INDEXED, 0xDEADBEEF_12345678, index_hash)
    raw = entry.encode()
    assert len(raw) == ENTRY.size == 48
    assert raw == struct.pack("<IIQ", 1234, PRESENT | LZ4 | INDEXED, 0xDEADBEEF_12345678) + index_hash
    assert Entry.decode(b"x" * 48 + raw, 48) == entry
    assert entry.present and entry.checked
    assert Entry(10, PRESENT | WHOLE, 1, bytes(32)).checked
    assert not Entry(10, PRESENT, 1, bytes(32)).checked  # stored unverified
    assert not Entry(10, WHOLE, 1, bytes(32)).checked  # a flag without the block
    assert ABSENT.encode() == bytes(48) and not ABSENT.present
    assert entry_offset(0) == 64 and entry_offset(3) == 64 + 3 * 48


def test_the_first_block_decides_the_blobs_lz4_policy():
    first = encode_block(TEXT, POLICY_UNDECIDED)
    assert first.flags == LZ4 and first.policy == POLICY_LZ4 and len(first.payload) < 0.1 * MiB
    noise = os.urandom(MiB)
    assert encode_block(noise, POLICY_LZ4) == encode_block(noise, POLICY_LZ4)  # pure
    stored = encode_block(noise, POLICY_LZ4)
    assert stored.flags == 0 and stored.payload == noise  # lz4 does not shrink it: stored raw
    weights = encode_block(noise, POLICY_UNDECIDED)
    assert weights.policy == POLICY_RAW and weights.flags == 0
    later = encode_block(TEXT, POLICY_RAW)  # weights first: text later is not even tried
    assert later.flags == 0 and later.payload is TEXT and later.policy == POLICY_RAW


def test_a_first_block_that_barely_compresses_is_stored_compressed_but_sets_raw():
    """Below 15% saved lz4 does not pay for the blob, yet that one block is kept smaller."""
    block = TEXT[:MiB // 8] + os.urandom(MiB - MiB // 8)
    encoded = encode_block(block, POLICY_UNDECIDED)
    assert encoded.policy == POLICY_RAW and encoded.flags == LZ4 and len(encoded.payload) < len(block)
    assert decode_block(bytes(encoded.payload), encoded.flags, MiB) == block


def test_stored_bytes_decode_to_the_block_or_are_told_undecodable():
    encoded = encode_block(TEXT, POLICY_LZ4)
    assert decode_block(bytes(encoded.payload), LZ4, MiB) == TEXT
    assert decode_block(b"raw bytes", 0, 9) == b"raw bytes"
    with pytest.raises(Undecodable):
        decode_block(b"\xff" * 64, LZ4, MiB)
    assert checksum(b"") != checksum(b"\0") and checksum(TEXT) == checksum(bytearray(TEXT))


def test_usage_counts_the_short_last_block_and_needs_every_entry_checked():
    header = Header.of(2 * MiB + 5, MiB)
    whole = Entry(MiB, PRESENT | WHOLE, 1, bytes(32)).encode()
    tail = Entry(5, PRESENT | INDEXED, 2, os.urandom(32)).encode()
    assert usage(header, whole + whole + tail) == (2 * MiB + 5, True)
    assert usage(header, whole + ABSENT.encode() + tail) == (MiB + 5, False)
    assert usage(header, whole + Entry(MiB, PRESENT, 3, bytes(32)).encode() + tail) == (2 * MiB + 5, False)
    assert usage(header, whole + whole) == (2 * MiB, False)  # a map cut short


def test_the_copy_in_memory_keeps_its_count_exact():
    blocks = BlockMap(Header.of(2 * MiB + 5, MiB))
    assert blocks.present == 0 and blocks.cached_bytes() == 0 and blocks.entries() == bytes(3 * 48)
    present = Entry(5, PRESENT, 9, bytes(32)).encode()
    blocks.set(2, present)
    blocks.set(2, present)  # again: still one
    assert blocks.present == 1 and blocks.cached_bytes() == 5 and blocks.stored_bytes() == 5
    blocks.set(0, Entry(100, PRESENT | LZ4, 9, bytes(32)).encode())
    assert blocks.cached_bytes() == MiB + 5 and blocks.stored_bytes() == 105
    blocks.set(2, ABSENT.encode())
    assert blocks.present == 1 and blocks.cached_bytes() == MiB and blocks.get(2) == ABSENT
    blocks.load(POLICY_LZ4, present * 2)  # short: the rest absent
    assert blocks.policy == POLICY_LZ4 and blocks.present == 2 and not blocks.get(2).present
    assert blocks.header() == Header.of(2 * MiB + 5, MiB, POLICY_LZ4)


def test_complete_scans_on_from_the_first_block_not_known_present():
    blocks = BlockMap(Header.of(4 * MiB, MiB))
    asked: list[int] = []
    on_disk = {0, 1}

    def has(index: int) -> bool:
        asked.append(index)
        return index in on_disk

    assert not blocks.complete(has) and asked == [0, 1, 2]
    on_disk |= {2, 3}
    assert blocks.complete(has) and asked == [0, 1, 2, 2, 3]  # not from 0 again
    blocks.set(1, Entry(1, PRESENT, 1, bytes(32)).encode())
    blocks.set(1, ABSENT.encode())  # dropped: the scan starts over from there
    on_disk.discard(1)
    assert not blocks.complete(has) and asked[-1] == 1
    assert BlockMap(Header.of(0, MiB)).complete(has)  # an empty blob
