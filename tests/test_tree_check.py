"""One tree check over all layers, for the mount and for extract alike: a symlink chain
across two layers, one path claimed by two layers (two files, a file and a directory, a
directory through a symlink) are refused by both with the same line; extract leaves
--output as it was; a path 1,500 directories deep (legal under 4096 bytes) works in both."""

from __future__ import annotations

import gzip
import os
import stat
import tarfile
from pathlib import Path

import pytest
from conftest import make_tar, push_artifact

from modelfs.errors import UnsafePathError
from modelfs.formats import zstd

WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_TAR = "application/vnd.cncf.model.weight.v1.tar"
WEIGHT_TGZ = "application/vnd.cncf.model.weight.v1.tar+gzip"
WEIGHT_TZST = "application/vnd.cncf.model.weight.v1.tar+zstd"


def raw(path: str, data: bytes = b"weights") -> tuple[bytes, str, dict]:
    return data, WEIGHT_RAW, {"org.cncf.model.filepath": path}


def snapshot(root: Path) -> dict[str, object]:
    """Everything under ``root``, links not followed, walked without recursion."""
    found: dict[str, object] = {}
    pending = [""]
    while pending:
        relative = pending.pop()
        for name in os.listdir(root / relative):
            path = f"{relative}/{name}" if relative else name
            info = os.lstat(root / path)
            if stat.S_ISLNK(info.st_mode):
                found[path] = ("link", os.readlink(root / path))
            elif stat.S_ISDIR(info.st_mode):
                found[path] = "dir"
                pending.append(path)
            else:
                found[path] = (root / path).read_bytes()
    return found


def a_user_output(sandbox: Path) -> Path:
    """An --output that already holds the user's files, beside a secret a link could reach."""
    sandbox.mkdir()
    (sandbox / "secret").write_bytes(b"TOPSECRET")
    out = sandbox / "out"
    (out / "elsewhere").mkdir(parents=True)
    (out / "mine.txt").write_bytes(b"the user's notes")
    (out / "config.json").write_bytes(b"the user's config")
    return out


def refused_alike(cli, mounts, ref: str, out: Path, *fragments: str) -> str:
    """extract and mount refuse ``ref`` with the same one line, holding every fragment;
    --output (and what is beside it) is left exactly as it was."""
    before, beside = snapshot(out), sorted(os.listdir(out.parent))
    result = cli.run("extract", "--plain-http", ref, "--output", str(out), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    line = lines[0].removeprefix("modelfs: error: ")
    assert all(fragment in line for fragment in fragments), line
    assert snapshot(out) == before and sorted(os.listdir(out.parent)) == beside
    mounted = mounts.refused(ref, "--prefetch", "none")
    assert mounted.returncode == 1 and line in mounted.stderr, (line, mounted.stderr)
    return line


def test_a_symlink_chain_across_two_layers_is_refused_alike(cli, registry, mounts, tmp_path):
    """`a/b/p -> ..` (layer 1) and `a/b/q -> p/../../secret` (layer 2) each stay inside alone;
    followed together, q leads out of --output. extract checked each layer alone and wrote q."""
    layers = [raw("w.bin"),
              (gzip.compress(make_tar([("a/b", None, {"type": tarfile.DIRTYPE}),
                                       ("a/b/p", None, {"type": tarfile.SYMTYPE, "linkname": ".."})])), WEIGHT_TGZ, {}),
              (zstd.compress(make_tar([("a/b/q", None, {"type": tarfile.SYMTYPE, "linkname": "p/../../secret"})])),
               WEIGHT_TZST, {})]
    ref = push_artifact(registry.address, "tree/chain2", layers)
    out = a_user_output(tmp_path / "sandbox")
    line = refused_alike(cli, mounts, ref, out, "layer 2 (", "symlink 'a/b/q' -> 'p/../../secret' leaves the model tree",
                         "'a/b/p' -> '..' in layer 1 (")
    assert line.startswith("layer 2 (sha256:")


@pytest.mark.parametrize("name, layers, fragments", [
    ("twice", [raw("config.json", b"{}"), (make_tar([("config.json", b"{ }", {})]), WEIGHT_TAR, {})],
     ["layer 1 (", "duplicate path 'config.json' (also in layer 0 ("]),
    ("filedir", [raw("model"), (gzip.compress(make_tar([("model/x.bin", b"x", {})])), WEIGHT_TGZ, {})],
     ["layer 1 (", "member 'model/x.bin': 'model' is both a file and a directory (a file in layer 0 ("]),
    ("dirfile", [(zstd.compress(make_tar([("model/x.bin", b"x", {})])), WEIGHT_TZST, {}), raw("model")],
     ["layer 1 (", "'model' is both a file and a directory (a directory in layer 0 ("]),
    ("throughlink", [(make_tar([("sub", None, {"type": tarfile.DIRTYPE}),
                                ("d", None, {"type": tarfile.SYMTYPE, "linkname": "sub"})]), WEIGHT_TAR, {}),
                     raw("d/w.bin")],
     ["layer 1 (", "'d' is both a symlink and a directory (a symlink in layer 0 ("]),
])
def test_one_path_claimed_by_two_layers_is_refused_alike(cli, registry, mounts, tmp_path, name, layers, fragments):
    """extract overwrote the first silently, died with a traceback on a file against a
    directory, and wrote through a symlink of an earlier layer; the mount refused each."""
    ref = push_artifact(registry.address, f"tree/{name}", layers)
    refused_alike(cli, mounts, ref, a_user_output(tmp_path / "sandbox"), *fragments)


def test_extract_never_follows_or_removes_what_output_already_holds(cli, registry, tmp_path):
    """A symlink already in --output is not written through (even one that points inside),
    nor replaced by a directory; a directory is not replaced by a file. Extracting again
    replaces the model's own files and keeps the user's."""
    ref = push_artifact(registry.address, "tree/output", [raw("weights/w.bin", b"new weights"), raw("config.json", b"{}")])
    out = a_user_output(tmp_path / "sandbox")
    os.symlink("elsewhere", out / "weights")
    before = snapshot(out)
    result = cli.run("extract", "--plain-http", ref, "--output", str(out), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "layer 0 (" in lines[0] and "'weights' is a directory of the model and already a symlink in --output" in lines[0]
    assert snapshot(out) == before and os.listdir(out / "elsewhere") == []

    os.unlink(out / "weights")
    (out / "config.json").unlink()
    (out / "config.json").mkdir()
    result = cli.run("extract", "--plain-http", ref, "--output", str(out), check=False)
    assert result.returncode == 1 and "'config.json' is a file of the model and already a directory" in result.stderr
    (out / "config.json").rmdir()

    for _ in range(2):  # again over its own files
        cli.run("extract", "--plain-http", ref, "--output", str(out))
        assert snapshot(out) == {"elsewhere": "dir", "mine.txt": b"the user's notes", "weights": "dir",
                                 "weights/w.bin": b"new weights", "config.json": b"{}"}


def test_a_legal_tree_over_every_packing_is_extracted_and_mounted_alike(cli, registry, mounts, tmp_path):
    """What the check must not refuse: a link to a directory (nothing beneath it), a chain
    across layers that stays inside, a hard link to a file of its layer, one directory
    shared by several layers."""
    layers = [raw("sub/w.bin", b"weights"),
              (make_tar([("sub/cfg.json", b"{}", {}), ("latest", None, {"type": tarfile.SYMTYPE, "linkname": "sub"})]),
               WEIGHT_TAR, {}),
              (gzip.compress(make_tar([("sub/docs/a.txt", b"docs", {}),
                                       ("sub/docs/b.txt", None, {"type": tarfile.LNKTYPE, "linkname": "sub/docs/a.txt"})])),
               WEIGHT_TGZ, {}),
              (zstd.compress(make_tar([("link", None, {"type": tarfile.SYMTYPE, "linkname": "latest/w.bin"})])), WEIGHT_TZST, {})]
    ref = push_artifact(registry.address, "tree/legal", layers)
    out = tmp_path / "out"
    cli.run("extract", "--plain-http", ref, "--output", str(out))
    expected = {"sub": "dir", "sub/w.bin": b"weights", "sub/cfg.json": b"{}", "latest": ("link", "sub"),
                "sub/docs": "dir", "sub/docs/a.txt": b"docs", "sub/docs/b.txt": b"docs", "link": ("link", "latest/w.bin")}
    assert snapshot(out) == expected
    target = mounts.mount(ref, "--prefetch", "none")
    assert snapshot(target) == expected and (target / "link").read_bytes() == (out / "link").read_bytes() == b"weights"


DEPTH = 1500


def _walk_down(root: Path) -> bytes:
    """Down a chain of `d` directories by descriptor (no path string as long as the chain):
    each level must list exactly one entry; the bytes of the file at the bottom."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(DEPTH):
            assert os.listdir(fd) == ["d"]
            deeper = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = deeper
        assert os.listdir(fd) == ["w.bin"]
        file = os.open("w.bin", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
        with os.fdopen(file, "rb") as handle:
            return handle.read()
    finally:
        os.close(fd)


def test_a_path_1500_directories_deep_is_extracted_and_mounted(cli, registry, mounts, tmp_path):
    """3,005 bytes, legal under Linux's 4096: extract died with RecursionError (os.makedirs)."""
    path = "d/" * DEPTH + "w.bin"
    ref = push_artifact(registry.address, "tree/deep", [(gzip.compress(make_tar([(path, b"deep weights", {})])),
                                                        WEIGHT_TGZ, {})])
    out = tmp_path / "out"
    try:
        for _ in range(2):  # the second time merges into the tree the first wrote
            cli.run("extract", "--plain-http", ref, "--output", str(out))
            assert sorted(os.listdir(out)) == ["d"] and _walk_down(out) == b"deep weights"
        target = mounts.mount(ref, "--prefetch", "none")
        assert _walk_down(target) == b"deep weights"
    finally:  # pytest removes old temporary directories by recursion, which a tree this deep breaks
        from modelfs.artifact.staging import remove_tree
        fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            remove_tree(fd, "out")
        finally:
            os.close(fd)


def test_the_check_names_both_layers_and_walks_without_recursion():
    from modelfs.formats.tree_check import DIRECTORY, HARDLINK, REGULAR, SYMLINK, TreeCheck  # new: the old code had none
    check = TreeCheck()
    check.add("w.bin", REGULAR, "layer 0 (w)")
    check.add("a/b/p", SYMLINK, "layer 1 (t), member 'a/b/p'", "layer 1 (t)", "..")
    with pytest.raises(UnsafePathError, match=r"member 'h': hard link to 'w.bin', which is not a regular file of this layer"):
        check.add("h", HARDLINK, "layer 1 (t), member 'h'", "layer 1 (t)", "w.bin")
    deep = "/".join(["d"] * 2000)
    check.add(deep, DIRECTORY, "layer 2 (deep)")
    assert check.kind("d/d/d") == DIRECTORY and len(check.children()) == 2000 + 3
    check.add("a/b/q", SYMLINK, "layer 3 (u), member 'a/b/q'", "layer 3 (u)", "p/../../secret")
    with pytest.raises(UnsafePathError) as info:
        check.finish()
    assert str(info.value) == ("layer 3 (u), member 'a/b/q': symlink 'a/b/q' -> 'p/../../secret' leaves the model tree "
                               "once the links it goes through are followed ('a/b/p' -> '..' in layer 1 (t))")
