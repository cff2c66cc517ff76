"""Compressed tar layers walked as a stream: every byte out, every bad stream named.

Layers built this way are mounted from the real registry in test_mount and test_extract;
here the stream itself meets what other tools write (several gzip members, several zstd
frames) and what they should not (cut short, corrupt).
"""

import gzip
import os

import pytest
from conftest import make_tar

from modelfs.errors import ManifestError
from modelfs.formats import zstd
from modelfs.formats.spec import Packing
from modelfs.formats.tarindex import iter_members
from modelfs.mount.stream import _WINDOW, StreamSource, _Decompressor

FILES = {"a.txt": b"hello", "b/c.bin": bytes(range(256)) * 9, "weights.bin": os.urandom(3 << 20)}
TAR = make_tar([(path, data, {}) for path, data in FILES.items()])
WHERE = "layer 2 (sha256:0123456789ab, weights.tar.gz)"


def in_pieces(blob: bytes, size: int):
    async def chunks():
        for start in range(0, len(blob), size):
            yield blob[start:start + size]
    return chunks()


async def walk(blob: bytes, packing: Packing, chunk: int = 65536) -> dict[str, bytes]:
    source = StreamSource(in_pieces(blob, chunk), packing, WHERE)
    seen = {}
    async for member in iter_members(source, WHERE):
        seen[member.path] = await source.read(member.size)
    await source.drain()
    assert source.compressed_bytes == len(blob)
    return seen


def split(data: bytes, parts: int) -> list[bytes]:
    step = len(data) // parts + 1
    return [data[i:i + step] for i in range(0, len(data), step)]


def gzip_members(data: bytes, parts: int) -> bytes:
    return b"".join(gzip.compress(piece) for piece in split(data, parts))


def zstd_frames(data: bytes, parts: int) -> bytes:
    return b"".join(zstd.compress(piece) for piece in split(data, parts))


@pytest.mark.parametrize("packing, blob", [
    (Packing.TAR_GZIP, gzip.compress(TAR)),
    (Packing.TAR_GZIP, gzip_members(TAR, 5)),  # as pigz --independent or `cat a.gz b.gz` write
    (Packing.TAR_ZSTD, zstd.compress(TAR)),
    (Packing.TAR_ZSTD, zstd_frames(TAR, 5)),  # as pzstd writes
], ids=["gzip", "gzip-members", "zstd", "zstd-frames"])
@pytest.mark.parametrize("chunk", [100, 65536, 1 << 30], ids=["small-chunks", "64k-chunks", "one-chunk"])
async def test_every_member_comes_out_whole(packing, blob, chunk):
    assert await walk(blob, packing, chunk) == FILES


async def test_output_held_back_by_the_window_limit_comes_out():
    """64 MiB of zeros is a few KiB of gzip: one chunk in, many bounded steps out."""
    big = {"zeros.bin": bytes(64 << 20)}
    blob = gzip.compress(make_tar([(path, data, {}) for path, data in big.items()]))
    assert await walk(blob, Packing.TAR_GZIP, chunk=1 << 30) == big


@pytest.mark.parametrize("packing, blob", [
    (Packing.TAR_GZIP, gzip.compress(TAR)[:-8]),  # trailer cut: the tar is whole, the gzip is not
    (Packing.TAR_GZIP, gzip.compress(TAR)[:len(gzip.compress(TAR)) // 2]),
    (Packing.TAR_ZSTD, zstd.compress(TAR)[:-3]),
], ids=["gzip-trailer", "gzip-half", "zstd-end"])
async def test_a_stream_cut_short_is_refused_with_the_layer_named(packing, blob):
    with pytest.raises(ManifestError) as info:
        await walk(blob, packing)
    assert str(info.value).startswith(WHERE + ":")
    assert "ends early" in str(info.value) or "stream ended inside the file" in str(info.value)


@pytest.mark.parametrize("packing, blob", [
    (Packing.TAR_GZIP, b"these bytes are not gzip at all"),
    (Packing.TAR_ZSTD, b"these bytes are not zstd at all"),
    (Packing.TAR_GZIP, gzip.compress(TAR) + b"trailing garbage"),
], ids=["not-gzip", "not-zstd", "gzip-garbage-after"])
async def test_a_corrupt_stream_is_refused_with_the_layer_named(packing, blob):
    with pytest.raises(ManifestError) as info:
        await walk(blob, packing)
    assert str(info.value).startswith(WHERE + ": corrupt compressed stream at byte ")


@pytest.mark.parametrize("packing, compress", [
    (Packing.TAR_GZIP, gzip.compress),
    (Packing.TAR_ZSTD, zstd.compress),  # 256 MiB of zeros is about 8 KiB of zstd
], ids=["gzip", "zstd"])
def test_no_step_of_a_compression_bomb_outputs_more_than_the_window(packing, compress):
    size = 256 << 20
    blob = compress(bytes(size))
    assert len(blob) < size // 1000
    decompressor = _Decompressor(packing)
    steps = [len(decompressor.feed(blob))]
    while (out := decompressor.step()) is not None:
        steps.append(len(out))
    assert sum(steps) == size and decompressor.finished
    assert max(steps) <= _WINDOW
