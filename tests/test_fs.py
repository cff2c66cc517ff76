"""The FUSE layer never lets one request end the mount: entries no check foresaw become an
errno for that request, and what can be refused up front is refused with the layer named."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
from conftest import daemon_alive, make_tar, push_artifact

WEIGHT_TAR = "application/vnd.cncf.model.weight.v1.tar"
WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"


def _latin1_symlink_tar() -> bytes:
    """An ordinary GNU tar written on a Latin-1 system: the link target is not UTF-8."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        data = b"weights"
        info = tarfile.TarInfo("caf\xe9.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "caf\xe9.bin"
        tar.addfile(link)
    return buffer.getvalue()


def _huge_mtime_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("w.bin")
        info.size, info.mtime = 4, 2 ** 80  # written as GNU base-256
        tar.addfile(info, io.BytesIO(b"abcd"))
    return buffer.getvalue()


def test_latin1_symlink_target_is_listed_and_read(registry, mounts):
    ref = push_artifact(registry.address, "fs/latin1", [(_latin1_symlink_tar(), WEIGHT_TAR, {})])
    target, pid = mounts.mount_daemon(ref, "--prefetch", "none")
    names = os.listdir(os.fsencode(target))
    assert b"caf\xe9.bin" in names and b"link" in names
    for name in names:
        os.lstat(os.path.join(os.fsencode(target), name))  # `ls -l`
    assert os.readlink(os.path.join(os.fsencode(target), b"link")) == b"caf\xe9.bin"
    assert open(os.path.join(os.fsencode(target), b"link"), "rb").read() == b"weights"
    assert daemon_alive(pid)


def test_unpaired_surrogate_in_a_media_type_does_not_end_the_mount(registry, mounts):
    ref = push_artifact(registry.address, "fs/surrogate", [
        (b"weights", WEIGHT_RAW + "\ud800", {"org.cncf.model.filepath": "w.bin"})])
    target, pid = mounts.mount_daemon(ref, "--prefetch", "none")
    for name in os.listxattr(target / "w.bin"):  # what `cp -a` and `rsync -X` do
        os.getxattr(target / "w.bin", name)
    assert (target / "w.bin").read_bytes() == b"weights"
    assert daemon_alive(pid)


def test_unpaired_surrogate_in_a_file_path_is_refused_up_front(registry, mounts):
    ref = push_artifact(registry.address, "fs/badpath", [(b"weights", WEIGHT_RAW, {"org.cncf.model.filepath": "w\ud800.bin"})])
    result = mounts.refused(ref)
    assert result.returncode == 1 and "not a valid file name" in result.stderr and "layer 0" in result.stderr


def test_huge_tar_mtime_is_clamped_not_fatal(registry, mounts):
    ref = push_artifact(registry.address, "fs/mtime", [(_huge_mtime_tar(), WEIGHT_TAR, {})])
    target, pid = mounts.mount_daemon(ref, "--prefetch", "none")
    assert os.stat(target / "w.bin").st_mtime > 0
    assert (target / "w.bin").read_bytes() == b"abcd"
    assert daemon_alive(pid)


@pytest.mark.parametrize("name, members, message", [
    ("chain", [("a/b", None, {"type": tarfile.DIRTYPE}),
               ("a/b/p", None, {"type": tarfile.SYMTYPE, "linkname": ".."}),
               ("a/b/q", None, {"type": tarfile.SYMTYPE, "linkname": "p/../../../secret"})],
     "once the links it goes through are followed"),
    ("hardsym", [("s", None, {"type": tarfile.SYMTYPE, "linkname": "w.bin"}),
                 ("w.bin", b"data", {}),
                 ("h", None, {"type": tarfile.LNKTYPE, "linkname": "s"})],
     "not a regular file"),
])
def test_links_that_escape_or_point_at_links_are_refused_by_the_mount(registry, mounts, name, members, message):
    ref = push_artifact(registry.address, f"fs/{name}", [(make_tar(members), WEIGHT_TAR, {})])
    result = mounts.refused(ref)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and message in lines[0] and "layer 0" in lines[0], result.stderr
