import io
import tarfile

import pytest
from conftest import make_tar

from modelfs.errors import ManifestError, UnsafePathError
from modelfs.mount.tarindex import REGULAR, SYMLINK, RangeSource, index_tar, iter_members


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
