import hashlib
import io
import os
import tarfile
import time
from pathlib import Path

import pytest
from conftest import make_tar, push_artifact

from modelfs.errors import ManifestError, UnsafePathError
from modelfs.formats.tarindex import REGULAR, SYMLINK, RangeSource, index_tar, iter_members
from modelfs.storage.cache import BlockCache

MiB = 1 << 20
WEIGHT_TAR = "application/vnd.cncf.model.weight.v1.tar"


def _reader(blob: bytes):
    async def read_at(offset: int, size: int) -> bytes:
        return blob[offset:offset + size]
    return read_at


async def test_members_map_to_exact_offsets():
    long_name = "deep/" + "n" * 150 + "/weights.bin"
    blob = make_tar([("config.json", b"{}", {}), (long_name, b"W" * 5000, {"mode": 0o640}),
                     ("link", None, {"type": tarfile.SYMTYPE, "linkname": "config.json"})])
    members = await index_tar(_reader(blob), len(blob), "layer 0")
    assert [(m.path, m.kind, m.size) for m in members] == [
        ("config.json", REGULAR, 2), (long_name, REGULAR, 5000), ("link", SYMLINK, 0)]
    weights = members[1]
    assert blob[weights.offset:weights.offset + weights.size] == b"W" * 5000
    assert weights.mode == 0o640


@pytest.mark.parametrize("members, message", [
    ([("../escape", b"x", {})], "contains '..'"),
    ([("/etc/passwd", b"x", {})], "absolute path"),
    ([("a/../../b", b"x", {})], "contains '..'"),
    ([("link", None, {"type": tarfile.SYMTYPE, "linkname": "../../etc/shadow"})], "leaves the model tree"),
    ([("link", None, {"type": tarfile.SYMTYPE, "linkname": "/etc/shadow"})], "leaves the model tree"),
    ([("hard", None, {"type": tarfile.LNKTYPE, "linkname": "/etc/shadow"})], "absolute path"),
    ([("hard", None, {"type": tarfile.LNKTYPE, "linkname": "missing"})], "not an earlier member"),
    ([("dev", None, {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3})], "device, fifo or unknown"),
    ([("fifo", None, {"type": tarfile.FIFOTYPE})], "device, fifo or unknown"),
    ([("dup", b"a", {}), ("dup", b"b", {})], "duplicate path"),
])
async def test_hostile_members_are_refused_with_their_name(members, message):
    blob = make_tar(members)
    with pytest.raises((UnsafePathError, ManifestError)) as info:
        await index_tar(_reader(blob), len(blob), "layer 3 (sha256:abc)")
    assert message in str(info.value) and "layer 3" in str(info.value)


async def test_size_beyond_the_blob_is_refused():
    blob = make_tar([("big", b"x" * 4096, {})])
    truncated = blob[:1024]
    with pytest.raises(ManifestError, match="past the end of the blob"):
        await index_tar(_reader(truncated), len(truncated), "layer 0")


async def test_garbage_is_not_a_tar():
    with pytest.raises(ManifestError, match="bad checksum"):
        await index_tar(_reader(b"x" * 2048), 2048, "layer 0")


@pytest.mark.parametrize("size", ["x1", "-5", "1e3"])
async def test_a_pax_size_that_is_not_a_byte_count_is_refused(size):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("w.bin")
        info.size, info.pax_headers = 3, {"size": size}
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ManifestError, match=f"layer 0, member 'w.bin': PAX size '{size}' is not a byte count"):
        await index_tar(_reader(buf.getvalue()), len(buf.getvalue()), "layer 0")


async def test_a_tar_of_too_many_members_is_refused():
    blob = make_tar([(f"f{i}", b"", {}) for i in range(5)])
    with pytest.raises(ManifestError, match="layer 0: over 4 tar members; refusing the layer"):
        async for _ in iter_members(RangeSource(_reader(blob)), "layer 0", len(blob), max_members=4):
            pass


async def test_headers_of_small_members_sharing_a_chunk_cost_one_read():
    """A PAX record and a header per member, 1,000 members: read in aligned chunks, each
    chunk once (the reader behind it used to be asked three times per member)."""
    blob = _many_member_tar(1000)
    calls: list[tuple[int, int]] = []

    async def read_at(offset: int, size: int) -> bytes:
        calls.append((offset, size))
        return blob[offset:offset + size]

    members = await index_tar(read_at, len(blob), "layer 0")
    assert len(members) == 1000
    assert all(blob[m.offset:m.offset + m.size] == _member_data(n) for n, m in enumerate(members))
    assert len(calls) <= len(blob) // (64 << 10) + 2
    assert all(offset % (64 << 10) == 0 for offset, _ in calls)  # aligned: never reaching into a block not needed


def _member_data(number: int) -> bytes:
    return b"vocab merges tokens %d " % number * (1 + number % 20)


def _many_member_tar(count: int) -> bytes:
    """Small text files as Python's tarfile writes a walked tree: a float mtime gives each
    member a PAX record, so three header reads per member."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for number in range(count):
            data = _member_data(number)
            info = tarfile.TarInfo(f"d{number % 50:02d}/f{number:05d}.txt")
            info.size, info.mtime = len(data), 1_700_000_000.5 + number
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _bytes_read(pid: int) -> int:
    """What the daemon read through read()/pread() so far (not sockets): its cache reads back."""
    return int(next(line for line in Path(f"/proc/{pid}/io").read_text().splitlines()
                    if line.startswith("rchar:")).split()[1])


def test_a_tar_of_many_small_files_mounts_reading_each_block_back_once(registry, mounts):
    """20,000 members, 60,000 header reads: each used to read its whole 1 MiB block back from
    the cache, check and decompress it (100,000 small files took 148-240 s to mount). Now
    each block is read back about once: the daemon reads about the blob's stored size."""
    count = 20_000
    blob = _many_member_tar(count)
    ref = push_artifact(registry.address, "tarindex/many", [(blob, WEIGHT_TAR, {})])
    for label in ("cold", "warm"):  # the first mount fetches the blob, the second finds it cached
        started = time.monotonic()
        target, pid = mounts.mount_daemon(ref, "--prefetch", "none")
        took = time.monotonic() - started
        read = _bytes_read(pid)
        entry = BlockCache(str(mounts.cli.cache_dir)).entry("sha256:" + hashlib.sha256(blob).hexdigest(), len(blob))
        stored = entry.stored_bytes()
        assert read < 16 * MiB + 2 * stored, (f"{label} mount: the daemon read {read / MiB:.0f} MiB to index a tar "
                                              f"stored in {stored / MiB:.1f} MiB (mounted in {took:.1f}s)")
        assert (target / "d07" / "f00007.txt").read_bytes() == _member_data(7)
        assert len(os.listdir(target / "d49")) == count // 50
        mounts.umount(target)
