"""The block-digest index: what push writes, what a mount accepts, what it ignores whole."""

import hashlib
import json
import os

import pytest

from modelfs.errors import ManifestError
from modelfs.formats.blockindex import decode, encode, fallback_tag, hash_blocks

DIGEST = "sha256:" + "cd" * 32


def test_hash_blocks_hashes_each_block_and_the_short_tail(tmp_path):
    import blake3
    data = os.urandom(2 * 4096 + 100)
    path = tmp_path / "blob"
    path.write_bytes(data)
    expected = [blake3.blake3(data[i:i + 4096]).hexdigest() for i in range(0, len(data), 4096)]
    assert hash_blocks(str(path), 4096) == expected and len(expected) == 3
    assert hash_blocks(str(path), 4096, "sha256") == [hashlib.sha256(data[i:i + 4096]).hexdigest()
                                                       for i in range(0, len(data), 4096)]


def test_version_2_names_its_algorithm_and_version_1_is_sha256():
    block = os.urandom(1000)
    v2 = decode(encode(1 << 20, {DIGEST: [hash_of(block, "blake3")]}))
    assert v2.algorithm == "blake3" and v2.block_hash(block) == v2.for_blob(DIGEST, 1 << 20)[0]
    assert json.loads(encode(1 << 20, {DIGEST: []}))["version"] == 2
    v1 = decode(json.dumps({"blockSize": 1 << 20, "blobs": {DIGEST: [hashlib.sha256(block).hexdigest()]}}).encode())
    assert v1.algorithm == "sha256" and v1.block_hash(block) == v1.for_blob(DIGEST, 1 << 20)[0]
    with pytest.raises(ManifestError, match="algorithm 'md5' is not one of"):
        decode(json.dumps({"version": 2, "algorithm": "md5", "blockSize": 1, "blobs": {}}).encode())


def hash_of(data: bytes, algorithm: str) -> str:
    from modelfs.formats.blockindex import ALGORITHMS
    return ALGORITHMS[algorithm](data).hex()


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
