"""The block-digest index: what push writes, what a mount accepts, what it ignores whole."""

import hashlib
import json
import os

import pytest

from modelfs.blockindex import decode, encode, fallback_tag, hash_blocks
from modelfs.errors import ManifestError

DIGEST = "sha256:" + "cd" * 32


def test_hash_blocks_hashes_each_block_and_the_short_tail(tmp_path):
    data = os.urandom(2 * 4096 + 100)
    path = tmp_path / "blob"
    path.write_bytes(data)
    expected = [hashlib.sha256(data[i:i + 4096]).hexdigest() for i in range(0, len(data), 4096)]
    assert hash_blocks(str(path), 4096) == expected and len(expected) == 3


def test_index_round_trips_and_matches_only_its_block_size(tmp_path):
    hashes = [hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()]
    index = decode(encode(1 << 20, {DIGEST: hashes}))
    assert index.for_blob(DIGEST, 1 << 20) == [bytes.fromhex(h) for h in hashes]
    assert index.for_blob(DIGEST, 4 << 20) is None  # a cache with other blocks cannot use it
    assert index.for_blob("sha256:" + "00" * 32, 1 << 20) is None


def test_fallback_tag_is_the_oci_referrers_tag_schema():
    assert fallback_tag(DIGEST) == "sha256-" + "cd" * 32


GOOD_HASH = "ab" * 32


@pytest.mark.parametrize("doc, fragment", [
    ({"blobs": {}}, "block index is malformed"),
    ({"blockSize": 0, "blobs": {}}, "blockSize 0 is not a positive integer"),
    ({"blockSize": "1048576", "blobs": {}}, "blockSize '1048576' is not a positive integer"),
    ({"blockSize": 1024}, "block index is malformed"),
    ({"blockSize": 1024, "blobs": [GOOD_HASH]}, "block index is malformed"),
    ({"blockSize": 1024, "blobs": {DIGEST: [GOOD_HASH, "zz" * 32]}}, "block index is malformed"),
    ({"blockSize": 1024, "blobs": {DIGEST: [GOOD_HASH[:40]]}}, "is not a sha256"),
    ({"blockSize": 1024, "blobs": {DIGEST: GOOD_HASH}}, "are not a list"),
    ([], "block index is malformed"),
])
def test_a_malformed_index_is_refused_whole(doc, fragment):
    with pytest.raises(ManifestError) as info:
        decode(json.dumps(doc).encode())
    assert fragment in str(info.value)


def test_a_garbage_index_is_refused():
    with pytest.raises(ManifestError, match="block index is not valid JSON"):
        decode(b"\x00\xff garbage")
