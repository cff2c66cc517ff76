"""Hostile and unusual artifacts, pushed by hand to the real registry: extract and mount
refuse what would escape the tree and serve what is merely unusual."""

import gzip
import os
import subprocess
import tarfile

import pytest
from conftest import make_tar, push_artifact

from modelfs.formats import zstd

WEIGHT_TAR = "application/vnd.cncf.model.weight.v1.tar"
WEIGHT_TGZ = "application/vnd.cncf.model.weight.v1.tar+gzip"
WEIGHT_RAW = "application/vnd.cncf.model.weight.v1.raw"
WEIGHT_TZST = "application/vnd.cncf.model.weight.v1.tar+zstd"


@pytest.mark.parametrize("name, layer, message", [
    ("dotdot", (make_tar([("../../evil", b"x", {})]), WEIGHT_TAR, {}), "contains '..'"),
    ("absolute", (make_tar([("/tmp/evil", b"x", {})]), WEIGHT_TAR, {}), "absolute path"),
    ("symlink", (make_tar([("ln", None, {"type": tarfile.SYMTYPE, "linkname": "/etc"})]), WEIGHT_TAR, {}), "leaves the model tree"),
    ("device", (make_tar([("null", None, {"type": tarfile.CHRTYPE})]), WEIGHT_TAR, {}), "device, fifo or unknown"),
    ("gzdotdot", (gzip.compress(make_tar([("../evil", b"x", {})])), WEIGHT_TGZ, {}), "contains '..'"),
    ("notgzip", (b"these bytes are not gzip", WEIGHT_TGZ, {}), "corrupt compressed stream"),
    ("cutgzip", (gzip.compress(make_tar([("w.bin", os.urandom(4096), {})]))[:-8], WEIGHT_TGZ, {}), "compressed stream ends early"),
    ("rawpath", (b"weights", WEIGHT_RAW, {"org.cncf.model.filepath": "../../evil"}), "contains '..'"),
    ("rawabs", (b"weights", WEIGHT_RAW, {"org.cncf.model.filepath": "/etc/evil"}), "absolute path"),
])
def test_hostile_layers_are_refused_by_extract_and_mount(cli, registry, mounts, tmp_path, name, layer, message):
    ref = push_artifact(registry.address, f"hostile/{name}", [layer])
    sandbox = tmp_path / "sandbox"
    out = sandbox / "out"
    sandbox.mkdir()
    result = cli.run("extract", "--plain-http", ref, "--output", str(out), check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "layer 0" in lines[0] and message in lines[0], result.stderr
    assert os.listdir(sandbox) == []  # --output did not exist before: it does not now
    assert not os.path.exists("/tmp/evil") and not os.path.exists(tmp_path / "evil")

    mounted = mounts.refused(ref, "--prefetch", "none")
    assert mounted.returncode == 1 and message in mounted.stderr, mounted.stderr


def test_multi_file_gzip_layer_without_annotations(cli, registry, mounts, tmp_path):
    files = {"tokenizer/vocab.txt": b"hello\nworld\n" * 1000, "weights/part-1.bin": os.urandom(3 << 20),
             "README": b"docs"}
    blob = gzip.compress(make_tar([(path, data, {}) for path, data in files.items()]
                                  + [("weights/current", None, {"type": tarfile.SYMTYPE, "linkname": "part-1.bin"})]))
    ref = push_artifact(registry.address, "unusual/multi", [(blob, WEIGHT_TGZ, {})])
    target = mounts.mount(ref, "--prefetch", "none")
    for path, data in files.items():
        assert (target / path).read_bytes() == data
    assert os.readlink(target / "weights" / "current") == "part-1.bin"
    assert (target / "weights" / "current").read_bytes() == files["weights/part-1.bin"]
    out = tmp_path / "out"
    cli.run("extract", "--plain-http", ref, "--output", str(out))
    for path, data in files.items():
        assert (out / path).read_bytes() == data


def test_a_layer_refused_halfway_leaves_nothing_behind(cli, registry, tmp_path):
    good_then_bad = make_tar([("first.bin", b"written before the bad member", {}), ("../escape", b"x", {})])
    ref = push_artifact(registry.address, "hostile/halfway", [(good_then_bad, WEIGHT_TAR, {})])
    out = tmp_path / "out"
    result = cli.run("extract", "--plain-http", ref, "--output", str(out), check=False)
    assert result.returncode == 1 and "contains '..'" in result.stderr, result.stderr
    assert not out.exists()


def _pieces(data: bytes, parts: int) -> list[bytes]:
    step = len(data) // parts + 1
    return [data[i:i + step] for i in range(0, len(data), step)]


@pytest.mark.parametrize("media_type, compress", [
    (WEIGHT_TGZ, lambda tar: b"".join(gzip.compress(p) for p in _pieces(tar, 4))),
    (WEIGHT_TZST, lambda tar: b"".join(zstd.compress(p) for p in _pieces(tar, 4))),
], ids=["gzip-members", "zstd-frames"])
def test_layers_of_several_gzip_members_or_zstd_frames_are_read_whole(cli, registry, mounts, tmp_path, media_type, compress):
    """pigz --independent, pzstd and `cat a.gz b.gz` write these; Go's readers (modctl) read them whole."""
    files = {"weights/part-1.bin": os.urandom(2 << 20), "weights/part-2.bin": os.urandom(1 << 20), "README": b"docs"}
    blob = compress(make_tar([(path, data, {}) for path, data in files.items()]))
    ref = push_artifact(registry.address, f"unusual/{media_type.rsplit('+', 1)[1]}-pieces", [(blob, media_type, {})])
    out = tmp_path / "out"
    cli.run("extract", "--plain-http", ref, "--output", str(out))
    target = mounts.mount(ref, "--prefetch", "none")
    for path, data in files.items():
        assert (out / path).read_bytes() == data
        assert (target / path).read_bytes() == data


@pytest.mark.parametrize("tar_format", ["gnu", "posix"])
def test_sparse_members_are_extracted_whole_and_refused_by_the_mount(cli, registry, mounts, tmp_path, tar_format):
    """GNU tar --sparse stores only the written regions (old GNU 'S' or PAX GNU.sparse 1.0):
    extract rebuilds the file; the mount has no contiguous bytes to serve and says so."""
    source = tmp_path / "src"
    source.mkdir()
    data = bytearray(5 << 20)
    data[2_000_000:2_000_006] = b"middle"
    (source / "holes.bin").write_bytes(b"")
    with open(source / "holes.bin", "r+b") as handle:
        handle.truncate(len(data))
        handle.seek(2_000_000)
        handle.write(b"middle")
    tar_path = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", f"--format={tar_format}", "-cf", str(tar_path), "-C", str(source), "holes.bin"],
                   check=True)
    assert tar_path.stat().st_size < 1 << 20  # really stored sparse
    ref = push_artifact(registry.address, f"unusual/sparse-{tar_format}", [(tar_path.read_bytes(), WEIGHT_TAR, {})])
    out = tmp_path / "out"
    cli.run("extract", "--plain-http", ref, "--output", str(out))
    assert (out / "holes.bin").read_bytes() == bytes(data)
    mounted = mounts.refused(ref, "--prefetch", "none")
    assert mounted.returncode == 1
    assert "layer 0" in mounted.stderr and "member 'holes.bin': a sparse file (tar --sparse)" in mounted.stderr, mounted.stderr


def test_empty_files_and_an_empty_blob_are_served_extracted_and_pulled(cli, registry, mounts, tmp_path):
    ref = push_artifact(registry.address, "unusual/empty",
                        [(b"", "application/vnd.cncf.model.code.v1.raw", {"org.cncf.model.filepath": "pkg/__init__.py"}),
                         (make_tar([("empty.txt", b"", {}), ("one.txt", b"1", {})]), "application/vnd.cncf.model.doc.v1.tar", {})])
    target = mounts.mount(ref, "--prefetch", "all")
    assert os.stat(target / "pkg" / "__init__.py").st_size == 0
    assert [(target / p).read_bytes() for p in ("pkg/__init__.py", "empty.txt", "one.txt")] == [b"", b"", b"1"]
    out = tmp_path / "out"
    cli.run("extract", "--plain-http", ref, "--output", str(out))
    assert [(out / p).read_bytes() for p in ("pkg/__init__.py", "empty.txt", "one.txt")] == [b"", b"", b"1"]
    cli.run("pull", "--plain-http", ref)
    log = "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
    assert " ERROR " not in log and " WARNING " not in log, log


def test_unusual_file_names_are_served_and_extracted_as_named(cli, registry, mounts, tmp_path):
    names = ["模型/权重 v2.bin", "with space.txt", "ümlaut-ß.json", "a\nnewline.txt"]
    ref = push_artifact(registry.address, "unusual/names",
                        [(n.encode(), "application/vnd.cncf.model.doc.v1.raw", {"org.cncf.model.filepath": n}) for n in names[:2]]
                        + [(make_tar([(n, n.encode(), {}) for n in names[2:]]), "application/vnd.cncf.model.doc.v1.tar", {})])
    target = mounts.mount(ref, "--prefetch", "none")
    out = tmp_path / "out"
    cli.run("extract", "--plain-http", ref, "--output", str(out))
    for name in names:
        assert (target / name).read_bytes() == name.encode() == (out / name).read_bytes()
    assert sorted(os.listdir(target)) == sorted(["模型", "with space.txt", "ümlaut-ß.json", "a\nnewline.txt"])


def test_unknown_media_type_with_a_path_is_served_as_a_file(cli, registry, mounts):
    ref = push_artifact(registry.address, "unusual/mediatype",
                        [(b"plain bytes", "application/x-something", {"org.cncf.model.filepath": "notes.bin"})])
    target = mounts.mount(ref, "--prefetch", "none")
    assert (target / "notes.bin").read_bytes() == b"plain bytes"


def test_legacy_cnai_artifacts_are_read(cli, registry, mounts):
    ref = push_artifact(registry.address, "legacy/cnai",
                        [(b"legacy weights", "application/vnd.cnai.model.weight.v1.raw", {"org.cnai.model.filepath": "w.bin"})],
                        config_media_type="application/vnd.cnai.model.config.v1+json")
    target = mounts.mount(ref, "--prefetch", "none")
    assert (target / "w.bin").read_bytes() == b"legacy weights"


@pytest.mark.parametrize("claimed", [5000, 500])
def test_manifest_lying_about_a_size_is_refused(cli, registry, tmp_path, claimed):
    import json

    import httpx
    push_artifact(registry.address, "lying/size", [(b"x" * 1000, WEIGHT_RAW, {"org.cncf.model.filepath": "w.bin"})])
    base = f"http://{registry.address}/v2/lying/size"
    manifest = httpx.get(f"{base}/manifests/v1", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    manifest["layers"][0]["size"] = claimed
    httpx.put(f"{base}/manifests/lie{claimed}", content=json.dumps(manifest),
              headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}).raise_for_status()
    lying = f"{registry.address}/lying/size:lie{claimed}"
    target = tmp_path / "mnt"
    target.mkdir()
    for args in (["mount", "--prefetch", "none", lying, str(target)], ["pull", lying],
                 ["extract", lying, "--output", str(tmp_path / "out")]):
        result = cli.run(args[0], "--plain-http", *args[1:], check=False)
        assert result.returncode == 1, args
        line = result.stderr.strip().splitlines()[-1]
        assert "layer 0 (" in line and "w.bin)" in line and f"{claimed} bytes" in line, line
    assert not os.path.exists(tmp_path / "out" / "w.bin")


def test_a_hard_link_to_an_escaping_symlink_chain_copies_no_host_file(cli, registry, tmp_path):
    """`a/b/p -> ..` and `a/b/q -> p/../../../secret` each pass a lexical check; a hard link to
    `a/b/q` once made extract copy a file from outside the output (any file the user can
    read: /etc/shadow as root, auth.json) into it."""
    members = [("a/b", None, {"type": tarfile.DIRTYPE}),
               ("a/b/p", None, {"type": tarfile.SYMTYPE, "linkname": ".."}),
               ("a/b/q", None, {"type": tarfile.SYMTYPE, "linkname": "p/../../../secret"}),
               ("stolen", None, {"type": tarfile.LNKTYPE, "linkname": "a/b/q"})]
    ref = push_artifact(registry.address, "hostile/chain", [(make_tar(members), WEIGHT_TAR, {})])
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "secret").write_bytes(b"TOPSECRET")  # where the chain leads, from the staging directory
    out = sandbox / "out"
    result = cli.run("extract", "--plain-http", ref, "--output", str(out), check=False)
    assert result.returncode == 1 and "hard link to 'a/b/q', which is not a regular file" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    for root, _, names in os.walk(out):
        for name in names:
            path = os.path.join(root, name)
            assert not os.path.isfile(path) or b"TOPSECRET" not in open(path, "rb").read()


@pytest.mark.parametrize("name, path, message", [
    ("longname", "a/" + "n" * 256, "of over 255 bytes"),
    ("longpath", "d/" * 2100 + "f", "bytes refused"),
])
def test_names_linux_cannot_hold_get_one_line(cli, registry, tmp_path, name, path, message):
    ref = push_artifact(registry.address, f"hostile/{name}", [(make_tar([(path, b"x", {})]), WEIGHT_TAR, {})])
    result = cli.run("extract", "--plain-http", ref, "--output", str(tmp_path / "out"), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr
