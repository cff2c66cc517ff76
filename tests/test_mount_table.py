"""The mount table module's pure parts: mountinfo lines, path resolution as the kernel does it,
and the names of the files kept per mount point (the FUSE tests in test_operations.py and
test_csi.py drive the same code through real mounts)."""

from __future__ import annotations

import os

from modelfs.mount import table


def test_mountinfo_lines_are_decoded_octal_escapes_and_any_bytes():
    line = rb"36 35 0:98 / /mnt/a\040b\011c\134d\012e\303\251 rw,nosuid shared:1 master:2 - fuse.modelfs reg\040x rw"
    found = table.parse_line(line + b"\n")
    assert found == table.Mount("/mnt/a b\tc\\d\ne\u00e9", "fuse.modelfs", "reg x", "0:98") and found.is_modelfs
    odd = table.parse_line(rb"1 2 0:1 / /mnt/\377 rw - fuse.sshfs h:/ rw")
    assert odd is not None and os.fsencode(odd.point) == b"/mnt/\xff" and odd.is_fuse and not odd.is_modelfs
    assert table.parse_line(b"garbage") is None


def test_resolve_follows_links_as_the_kernel_does(tmp_path):
    (tmp_path / "data" / "kubelet" / "pods").mkdir(parents=True)
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "kubelet").symlink_to(tmp_path / "data" / "kubelet")
    (tmp_path / "data" / "up").symlink_to("kubelet/pods")
    real = str(tmp_path / "data" / "kubelet" / "pods")
    assert table.resolve(str(tmp_path / "var" / "kubelet" / "pods"), points=[]) == real
    # `link/..` is the parent of where the link points, not the directory holding the link
    assert table.resolve(str(tmp_path / "data" / "up" / ".." / "pods" / "gone" / "mount"), points=[]) == f"{real}/gone/mount"
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert table.resolve(str(loop / "x"), points=[]) != str(tmp_path)  # ends, naming no mount


def test_resolve_never_looks_at_a_mount_point(tmp_path):
    """A mount point's daemon may be frozen: a point in the table is taken as it is (here a
    symlink stands in for it, and is not followed)."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "point").symlink_to(tmp_path / "elsewhere")
    assert table.resolve(str(tmp_path / "point"), points=[str(tmp_path / "point")]) == str(tmp_path / "point")
    assert table.resolve(str(tmp_path / "point"), points=[]) == str(tmp_path / "elsewhere")


def test_file_stems_are_one_per_mount_point():
    stems = {path: table.file_stem(path) for path in
             ("/models/x-y", "/models/x/y", "/models/x\\x2dy", "/", "/-", "/.hidden", "/a b", "/models/x-y/")}
    assert stems["/models/x-y"] == "models-x\\x2dy" and stems["/models/x/y"] == "models-x-y"
    assert stems["/models/x-y/"] == stems["/models/x-y"]  # one path, written two ways
    del stems["/models/x-y/"]
    assert len(set(stems.values())) == len(stems), stems
    assert all("/" not in stem and not stem.startswith(".") for stem in stems.values())
    long_a, long_b = "/" + "a" * 300, "/" + "a" * 299 + "b"
    assert table.file_stem(long_a) != table.file_stem(long_b)
    assert len(table.file_stem(long_a).encode()) <= table.MAX_STEM_BYTES
