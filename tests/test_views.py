"""Selective views (``--include`` / ``--exclude``): one decision (modelfs/formats/view.py) for
mount, pull, extract and a CSI volume, gitignore semantics, split GGUFs taken whole.

Real parts: the session's registry, the counting proxy in front of it, real FUSE mounts made
by the real CLI. The model is small (a few hundred KiB) so each test takes a few seconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import Cli, push_artifact, push_blob
from direct import read_direct_or_errno as read_direct
from proxy import CountingProxy

from modelfs import settings
from modelfs.csi import volume
from modelfs.errors import InvalidPattern
from modelfs.formats import blockindex
from modelfs.formats.view import View

KiB = 1 << 10
Q4 = [f"model-Q4_K_M-0000{n}-of-00003.gguf" for n in (1, 2, 3)]
Q8 = "model-Q8_0.gguf"


def make_files(root: Path) -> dict[str, bytes]:
    """Three splits of one quantization, another quantization, a config, a tokenizer directory
    and docs: what a loader's glob must not see the rest of."""
    files = {name: os.urandom(160 * KiB + n) for n, name in enumerate(Q4)}
    files[Q8] = os.urandom(400 * KiB)
    files["config.json"] = json.dumps({"hidden": 8}).encode()
    files["tokenizer/tokenizer.json"] = b'{"vocab": {}}'
    files["tokenizer/vocab.txt"] = b"a\nb\n"
    files["docs/README.md"] = b"# model\n"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "Modelfile").write_text("MODEL *.gguf\nCONFIG config.json\nCONFIG tokenizer/*\nDOC docs/README.md\n")
    return files


@pytest.fixture(scope="module")
def model(registry, session_cli, tmp_path_factory) -> tuple[str, dict[str, bytes]]:
    context = tmp_path_factory.mktemp("views")
    files = make_files(context)
    ref = f"{registry.address}/views/gguf:v1"
    session_cli.run("build", "-t", ref, str(context))
    session_cli.run("push", "--plain-http", ref)
    return ref, files


@contextmanager
def counting_proxy(registry) -> Iterator[CountingProxy]:
    counting = CountingProxy(registry.port)
    try:
        yield counting
    finally:
        counting.close()


def tree_of(root: Path) -> set[str]:
    """Every file, link and directory under ``root``, relative (a directory ends in '/')."""
    found: set[str] = set()
    for base, dirs, names in os.walk(root):
        rel = os.path.relpath(base, root)
        for name in names:
            found.add(name if rel == "." else f"{rel}/{name}")
        for name in dirs:
            found.add((name if rel == "." else f"{rel}/{name}") + "/")
    return found


# -- the patterns, pure ----------------------------------------------------------------------


def test_patterns_follow_gitignore():
    keeps = lambda view, *paths: [p for p in paths if view.keeps(p)]  # noqa: E731
    assert keeps(View.of(["sub/*.json"], None), "sub/a.json", "sub/d/a.json", "a.json") == ["sub/a.json"]  # * stops at /
    assert keeps(View.of(["sub/**/*.json"], None), "sub/a.json", "sub/d/e/a.json") == ["sub/a.json", "sub/d/e/a.json"]
    assert keeps(View.of(["tokenizer/"], None), "tokenizer/a", "tokenizer/b/c", "x/tokenizer") == ["tokenizer/a",
                                                                                                   "tokenizer/b/c"]
    assert keeps(View.of(["*.json"], None), "a.json", "d/e/a.json", "a.jsonl") == ["a.json", "d/e/a.json"]  # basename
    assert keeps(View.of(["/a.json"], None), "a.json", "d/a.json") == ["a.json"]  # anchored
    # ! takes back, the last match wins: the order of the lines decides
    assert keeps(View.of(None, ["tokenizer/", "!tokenizer/vocab.txt"]), "tokenizer/vocab.txt", "tokenizer/t.json") == [
        "tokenizer/vocab.txt"]
    assert keeps(View.of(None, ["!tokenizer/vocab.txt", "tokenizer/"]), "tokenizer/vocab.txt", "tokenizer/t.json") == []
    assert keeps(View.of(["*.gguf", "!*Q8*"], ["*00002-of*"]), *Q4, Q8, "config.json") == [Q4[0], Q4[2]]


def test_a_split_gguf_is_chosen_by_its_first_split_or_its_unsplit_name():
    for include in ("model-Q4_K_M.gguf", Q4[0], "*Q4_K_M*.gguf"):
        assert [p for p in [*Q4, Q8] if View.of([include], None).keeps(p)] == Q4, include
    assert [p for p in [*Q4, Q8] if View.of(None, ["model-Q4_K_M.gguf"]).keeps(p)] == [Q8]
    assert [p for p in [*Q4, Q8] if View.of([Q4[1]], None).keeps(p)] == [Q4[1]]  # one split named: that one
    assert [p for p in [*Q4, Q8] if View.of(None, [Q4[0]]).keeps(p)] == [Q8]  # the first split: all of them
    q4_0 = "model-Q4_0.gguf"
    assert [p for p in [*Q4, Q8, q4_0] if View.of(["model-Q4*"], None).keeps(p)] == [*Q4, q4_0]  # by prefix: both
    gapped = ["x-00001-of-00003.gguf", "x-00003-of-00003.gguf"]  # a split missing: the rest still chosen, no error
    assert [p for p in gapped if View.of(["x.gguf"], None).keeps(p)] == gapped
    assert View.of(["d/m.gguf"], None).keeps("d/m-00002-of-00002.gguf")  # in a directory too


def test_a_view_cuts_directories_left_empty():
    kinds = {"a": "dir", "a/x.gguf": "file", "b": "dir", "b/y.gguf": "file", "c": "dir", "d": "dir", "d/e": "dir",
             "d/e/l": "symlink"}
    assert View.of(None, ["*.gguf", "!a/"]).select(kinds) == {"a", "a/x.gguf", "d", "d/e", "d/e/l"}
    assert View().select(kinds) is None  # no pattern: the whole tree, empty directories too
    with pytest.raises(InvalidPattern, match="no file of the model is in the view"):
        View.of(["*.safetensors"], None).select(kinds)


@pytest.mark.parametrize("pattern", ["", "   ", "# a comment", "!", "\\"])
def test_a_bad_pattern_is_one_line(pattern):
    with pytest.raises(InvalidPattern) as caught:
        View.of([pattern], None)
    assert "\n" not in str(caught.value) and str(caught.value).startswith("--include: ")
    with pytest.raises(settings.ConfigError, match=r"^-o exclude: "):
        settings.fstab_flags(f"exclude={pattern}")


def test_gitignore_lines_as_git_reads_them():
    """The escapes, classes and ``**`` forms of gitignore(5), and names compared as they are."""
    keeps = lambda pattern, *paths: [p for p in paths if View.of([pattern], None).keeps(p)]  # noqa: E731
    assert keeps("note.txt\\ ", "note.txt", "note.txt ") == ["note.txt "]  # an escaped trailing space stays
    assert keeps("note.txt  ", "note.txt", "note.txt ") == ["note.txt"]  # an unescaped one goes
    assert keeps("\\!bang", "!bang", "bang") == ["!bang"] and keeps("\\#hash", "#hash") == ["#hash"]
    assert keeps("**/w.bin", "w.bin", "a/w.bin", "a/b/w.bin") == ["w.bin", "a/w.bin", "a/b/w.bin"]
    assert keeps("a/**/w.bin", "a/w.bin", "a/b/c/w.bin", "b/a/w.bin") == ["a/w.bin", "a/b/c/w.bin"]
    assert keeps("a/**", "a", "a/b", "a/b/c") == ["a/b", "a/b/c"]
    assert keeps("a/*", "a/b", "a/b/c", "b") == ["a/b", "a/b/c"]  # a/b is a directory it matches: all under it
    assert keeps("**/", "w.bin", "a/w.bin") == ["a/w.bin"] and keeps("**", "w.bin", "a/w.bin") == ["w.bin", "a/w.bin"]
    assert keeps("a?b", "a/b", "axb") == ["axb"] and keeps("a[!x]b", "a/b", "ayb") == ["ayb"]  # never a '/'
    assert keeps("sub/", "sub", "sub/a", "x/sub/a") == ["sub/a", "x/sub/a"]  # a file named like the directory: no
    assert keeps("m[0-9].bin", "m1.bin", "ma.bin") == ["m1.bin"] and keeps("n[!0-9]", "n1", "na") == ["na"]
    assert keeps("*.GGUF", "model.gguf") == []  # case-sensitive, as git on Linux
    nfc, nfd = "caf\u00e9.bin", "cafe\u0301.bin"
    assert keeps(nfc, nfc, nfd) == [nfc]  # compared as they are: no Unicode normalization


@pytest.mark.parametrize("pattern, words", [
    ("/", "clean and relative"), ("./a.bin", "clean and relative"), ("a//b", "clean and relative"),
    ("../a", "clean and relative"), ("[[:alpha:]]*", "POSIX character classes"), ("a\\", "lone '\\'"),
    ("x" * 5000, "longer than any path"), ("a\0b", "NUL byte")])
def test_a_pattern_that_can_match_no_path_is_refused(pattern, words):
    with pytest.raises(InvalidPattern, match=re.escape(words)) as caught:
        View.of(None, [pattern])
    assert "\n" not in str(caught.value) and str(caught.value).startswith("--exclude: ")


def test_too_many_patterns_are_refused_in_one_line(cli, tmp_path):
    with pytest.raises(settings.ConfigError, match=r"^include: 257 patterns; at most 256 are taken$"):
        settings.parse_patterns([f"f{n}.bin" for n in range(257)], "include")
    flags = [arg for n in range(257) for arg in ("--exclude", f"f{n}.bin")]
    for command in (["extract", "-o", str(tmp_path / "out")], ["mount"]):  # before the registry is asked
        args = [*command[:1], "--plain-http", "127.0.0.1:1/m:v1", *command[1:], *flags]
        refused = cli.run(*args, *([str(tmp_path)] if command == ["mount"] else []), check=False)
        assert refused.stderr.strip() == "modelfs: error: --exclude: 257 patterns; at most 256 are taken", refused.stderr


def test_matching_takes_polynomial_time():
    """A glob as a Python regex backtracks exponentially: this one against a 240-character name
    did not finish in a minute. Each check here is well under a second."""
    name = "a" * 240 + ".bin"
    started = time.monotonic()
    assert not View.of(["*a*a*a*a*a*a*a*a*.gguf"], None).keeps(name)
    assert not View.of(["**/*a*a*a*a*.gguf"], None).keeps("/".join(["a" * 200] * 20))
    # many '**' against a deep directory of many files: its state is kept, a file costs one step
    deep, view = "/".join(["a"] * 2000), View.of([("**/a/" * 800)[:4000] + "b"], None)
    assert not any(view.keeps(f"{deep}/f{n}") for n in range(300))
    assert time.monotonic() - started < 2


def test_settings_surfaces_give_the_same_lists():
    assert settings.fstab_flags("include=*.gguf") == ["--include=*.gguf"]
    assert settings.parse_patterns(["*.gguf", "!*Q8*"], "exclude") == ["*.gguf", "!*Q8*"]
    name, parsed = volume.parse_attributes({"reference": "r.example/m:1", "include": "*Q4_K_M*.gguf\nconfig.json",
                                            "exclude": "docs/, !docs/keep.md"})
    assert parsed == {"include": ["*Q4_K_M*.gguf", "config.json"], "exclude": ["docs/", "!docs/keep.md"]}
    spec = volume.VolumeSpec("v", "/t", name, {}, parsed)
    assert spec.mount_flags() == ["--include=*Q4_K_M*.gguf", "--include=config.json", "--exclude=docs/",
                                  "--exclude=!docs/keep.md"]
    # '\,' is a comma of a pattern, 'a\ ' keeps its space: as gitignore reads them
    assert volume.parse_attributes({"reference": "r.example/m:1", "include": "a\\,b.bin, note.txt\\ ,c"})[1] == {
        "include": ["a\\,b.bin", "note.txt\\ ", "c"]}
    assert View.of(["a\\,b.bin", "note.txt\\ "], None).keeps("a,b.bin") and View.of(["note.txt\\ "], None).keeps("note.txt ")
    with pytest.raises(volume.InvalidVolume, match=r"^volumeAttributes\.include: '# x' matches nothing"):
        volume.parse_attributes({"reference": "r.example/m:1", "include": "# x"})


# -- the real thing --------------------------------------------------------------------------


def test_mount_shows_only_the_view(model, mounts):
    ref, files = model
    target = mounts.mount(ref, "--prefetch", "none", "--exclude", "*.gguf", "--exclude", "!model-Q4_K_M.gguf",
                          "--exclude", "docs/", "--exclude", "tokenizer/", "--exclude", "!tokenizer/vocab.txt")
    assert tree_of(target) == {*Q4, "config.json", "tokenizer/", "tokenizer/vocab.txt"}
    assert sorted(str(p.relative_to(target)) for p in target.glob("*.gguf")) == Q4  # a loader's glob
    for absent in (Q8, "docs", "docs/README.md", "tokenizer/tokenizer.json"):
        with pytest.raises(FileNotFoundError):
            os.stat(target / absent)
    assert {name: read_direct(target / name) for name in (*Q4, "tokenizer/vocab.txt")} == {
        name: files[name] for name in (*Q4, "tokenizer/vocab.txt")}
    # the last match wins: the same lines the other way round take the whole tokenizer out
    other = mounts.mount(ref, "--prefetch", "none", "--include", "tokenizer/", "--include", "config.json",
                         "--exclude", "!tokenizer/vocab.txt", "--exclude", "tokenizer/")
    assert tree_of(other) == {"config.json"}


def test_a_bad_pattern_refuses_the_mount_in_one_line(model, mounts):
    result = mounts.refused(model[0], "--include", "#x")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].endswith(
        "--include: '#x' matches nothing (blank, or a # comment); give a gitignore pattern like '*.gguf' or "
        "'tokenizer/'")


def test_a_view_of_nothing_is_refused_in_one_line(model, mounts, cli, tmp_path):
    line = ("modelfs: error: --include / --exclude: no file of the model is in the view (see its files with "
            "`modelfs inspect`)")
    refused = mounts.refused(model[0], "--include", "model-Q5_K_M.gguf")
    assert refused.returncode != 0 and refused.stderr.strip() == line
    extracted = cli.run("extract", "--plain-http", model[0], "-o", str(tmp_path / "out"), "--exclude", "*", check=False)
    assert extracted.returncode == 1 and extracted.stderr.strip() == line and not (tmp_path / "out").exists()


def _status(cli: Cli, target: Path) -> dict:
    deadline = time.monotonic() + 30
    while True:
        found = next(m for m in json.loads(cli.run("status", "--json").stdout) if m["mountpoint"] == str(target))
        if found["bytes_local"] == found["bytes_total"] or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def test_prefetch_fetches_only_the_view(model, registry, mounts, cli):
    ref, files = model
    with counting_proxy(registry) as counting:
        target = mounts.mount(ref.replace(registry.address, counting.address), "--include", "model-Q4_K_M.gguf")
        found = _status(cli, target)
        view_bytes = sum(len(files[name]) for name in Q4)
        assert found["bytes_local"] == found["bytes_total"] == view_bytes
        assert view_bytes <= counting.downstream_bytes < view_bytes + 64 * KiB  # not the 400 KiB of Q8


def test_pull_fetches_only_the_view_and_its_record_mounts_offline(model, registry, mounts, tmp_path):
    ref, files = model
    cli = Cli(tmp_path / "home")
    view = ("--include", "model-Q4_K_M.gguf", "--include", "config.json")
    gone = CountingProxy(registry.port)
    via_gone = ref.replace(registry.address, gone.address)
    cli.run("pull", "--plain-http", *view, via_gone)
    view_bytes = sum(len(files[name]) for name in (*Q4, "config.json"))
    assert view_bytes <= gone.downstream_bytes < view_bytes + 64 * KiB
    gone.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", gone.port), timeout=2)
    # offline, the same view: the record and the cached blobs are enough
    offline = mounts.mount(via_gone, "--prefetch", "none", *view, cli=cli)
    assert tree_of(offline) == {*Q4, "config.json"}
    assert {name: read_direct(offline / name) for name in (*Q4, "config.json")} == {
        name: files[name] for name in (*Q4, "config.json")}
    again = cli.run("pull", "--plain-http", *view, via_gone)
    assert "already complete there" in again.stdout
    wider = cli.run("pull", "--plain-http", "--include", "*.gguf", via_gone, check=False)  # offline: says what is missing
    assert wider.returncode == 1 and len(wider.stderr.strip().splitlines()) == 1
    assert f"; not in the cache: 1 blob ({Q8}), so it cannot be pulled until the registry answers" in wider.stderr
    # online, a wider view fetches what is missing, and only that
    with counting_proxy(registry) as counting:
        wider = mounts.mount(ref.replace(registry.address, counting.address), "--prefetch", "none", cli=cli)
        assert read_direct(wider / Q8) == files[Q8] and read_direct(wider / Q4[0]) == files[Q4[0]]
        assert len(files[Q8]) <= counting.downstream_bytes < len(files[Q8]) + 64 * KiB


def test_two_mounts_with_different_views_share_the_cache(model, registry, mounts):
    ref, files = model
    with counting_proxy(registry) as counting:
        via = ref.replace(registry.address, counting.address)
        first = mounts.mount(via, "--prefetch", "none", "--include", "model-Q4_K_M.gguf")
        assert read_direct(first / Q4[1]) == files[Q4[1]]
        counting.reset()
        second = mounts.mount(via, "--prefetch", "none", "--include", "*.gguf", "--exclude", Q4[2])
        assert tree_of(second) == {Q4[0], Q4[1], Q8}
        assert read_direct(second / Q4[1]) == files[Q4[1]]
        assert counting.downstream_bytes < 32 * KiB, counting.downstream_bytes  # manifests only: the blob is cached


def test_extract_writes_only_the_view(model, registry, cli, tmp_path):
    ref, files = model
    out = tmp_path / "out"
    with counting_proxy(registry) as counting:
        cli.run("extract", "--plain-http", ref.replace(registry.address, counting.address), "-o", str(out),
                "--include", "model-Q4_K_M.gguf", "--include", "tokenizer/", "--exclude", "tokenizer.json")
        view = {*Q4, "tokenizer/vocab.txt"}
        assert counting.downstream_bytes < sum(len(files[name]) for name in view) + 64 * KiB  # Q8 never fetched
    assert tree_of(out) == view | {"tokenizer/"}
    assert {name: (out / name).read_bytes() for name in view} == {name: files[name] for name in view}


def _tar(entries: list[tuple[str, bytes | str]]) -> bytes:
    """A tar of files (bytes) and symlinks (str: the target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, what in entries:
            info = tarfile.TarInfo(name)
            if isinstance(what, str):
                info.type, info.linkname = tarfile.SYMTYPE, what
                tar.addfile(info)
            else:
                info.size = len(what)
                tar.addfile(info, io.BytesIO(what))
    return buffer.getvalue()


def test_a_link_in_the_view_to_a_file_outside_it_dangles(registry, mounts, cli, tmp_path):
    real = os.urandom(5000)
    layer = _tar([("sub/real.bin", real), ("sub/link.bin", "real.bin"), ("other/x.txt", b"x")])
    ref = push_artifact(registry.address, "views/links",
                        [(layer, "application/vnd.cncf.model.weight.v1.tar", {"org.cncf.model.filepath": "sub"})])
    target = mounts.mount(ref, "--prefetch", "none", "--exclude", "real.bin", "--exclude", "other/")
    assert os.readlink(target / "sub/link.bin") == "real.bin" and not os.path.exists(target / "sub/link.bin")
    assert sorted(os.listdir(target)) == ["sub"] and os.listdir(target / "sub") == ["link.bin"]
    out = tmp_path / "out"
    cli.run("extract", "--plain-http", ref, "-o", str(out), "--exclude", "real.bin", "--exclude", "other/")
    assert tree_of(out) == {"sub/", "sub/link.bin"} and os.readlink(out / "sub/link.bin") == "real.bin"
    assert read_direct(mounts.mount(ref, "--prefetch", "none", "--include", "sub/") / "sub/link.bin") == real


def test_pull_of_a_view_takes_a_compressed_layer_whole_only_when_it_must(registry, tmp_path, mounts):
    """A tar+gzip layer has no random access: pulled whole when it holds a file of the view, or
    when only streaming it can list it (an offline mount of the view lists it again); a raw
    layer outside the view is never fetched."""
    import gzip
    inside, outside = os.urandom(200 * KiB), os.urandom(300 * KiB)
    packed = gzip.compress(_tar([("tok/a.json", b"{}"), ("tok/b.bin", inside)]), compresslevel=1)
    ref = push_artifact(registry.address, "views/gzip", [
        (packed, "application/vnd.cncf.model.weight.v1.tar+gzip", {}),
        (outside, "application/vnd.cncf.model.weight.v1.raw", {"org.cncf.model.filepath": "w.bin"})])
    cli = Cli(tmp_path / "home")
    gone = CountingProxy(registry.port)
    via_gone = ref.replace(registry.address, gone.address)
    cli.run("pull", "--plain-http", "--include", "tok/b.bin", via_gone)
    # once (listing streams it from the cache), and never the 300 KiB of w.bin
    assert len(packed) <= gone.downstream_bytes < len(packed) + 64 * KiB
    gone.close()
    offline = mounts.mount(via_gone, "--prefetch", "none", "--include", "tok/b.bin", cli=cli)
    assert tree_of(offline) == {"tok/", "tok/b.bin"} and read_direct(offline / "tok/b.bin") == inside


def test_a_hostile_name_does_not_hang_a_view(registry, mounts, cli, tmp_path):
    """A publisher's 240-character name against an operator's many-star pattern: the view is
    decided in milliseconds (a regex took minutes: the mount never came up); escaped names too."""
    hostile, wanted, bang, spaced = os.urandom(3000), os.urandom(4000), b"!", b" "
    raw = "application/vnd.cncf.model.weight.v1.raw"
    ref = push_artifact(registry.address, "views/hostile", [
        (hostile, raw, {"org.cncf.model.filepath": "a" * 240 + ".bin"}),
        (wanted, raw, {"org.cncf.model.filepath": "w.gguf"}),
        (bang, raw, {"org.cncf.model.filepath": "!bang"}),
        (spaced, raw, {"org.cncf.model.filepath": "note.txt "})])
    out = tmp_path / "out"
    cli.run("extract", "--plain-http", ref, "-o", str(out), "--include", "*a*a*a*a*a*a*a*a*.gguf", "--include",
            "w.gguf", timeout=30)
    assert tree_of(out) == {"w.gguf"} and (out / "w.gguf").read_bytes() == wanted
    # gitignore's escapes: a name starting with '!', one ending in a space
    target = mounts.mount(ref, "--prefetch", "none", "--include", "*a*a*a*a*a*a*a*a*.gguf", "--include", "\\!bang",
                          "--include", "note.txt\\ ")
    assert tree_of(target) == {"!bang", "note.txt "} and read_direct(target / "note.txt ") == spaced


@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_a_csi_pod_narrows_the_nodes_view_never_widens_it(model, cli, tmp_path):
    """The node's config (/etc/modelfs/config.toml) is the operator's, never a pod's to change
    (doc/KUBERNETES.md): a pod's exclude adds to the node's, a pod's include cannot bring back
    what the node left out. A flag replacing the config's list let a pod see docs/ again."""
    import grpc
    from csi_plugin import Plugin
    ref, files = model
    node_config = tmp_path / "config.toml"
    node_config.write_text('exclude = ["docs/", "model-Q8_0.gguf"]\n')
    plugin = Plugin(tmp_path / "node", dict(cli.env, MODELFS_CONFIG=str(node_config)))
    plugin.start()
    try:
        target = plugin.target()
        plugin.client.publish("vol-1", target, {"reference": ref, "plain_http": "true", "prefetch": "none",
                                                "exclude": "tokenizer/"})
        assert tree_of(target) == {*Q4, "config.json"} and read_direct(target / Q4[2]) == files[Q4[2]]
        with pytest.raises(grpc.RpcError) as refused:
            plugin.client.publish("vol-2", plugin.target("wider"), {"reference": ref, "plain_http": "true",
                                                                   "include": "docs/, model-Q8_0.gguf"})
        assert "no file of the model is in the view" in refused.value.details()
    finally:
        plugin.cleanup()


def _hardlinked_tar(real: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("w/real.bin")
        info.size = len(real)
        tar.addfile(info, io.BytesIO(real))
        link = tarfile.TarInfo("v/link.bin")
        link.type, link.linkname = tarfile.LNKTYPE, "w/real.bin"
        tar.addfile(link)
        chain = tarfile.TarInfo("v/sym.bin")
        chain.type, chain.linkname = tarfile.SYMTYPE, "link.bin"
        tar.addfile(chain)
    return buffer.getvalue()


@pytest.mark.parametrize("packing", ["tar", "tar+gzip"])
def test_a_hard_link_in_the_view_to_a_file_outside_it_has_its_bytes(registry, mounts, cli, tmp_path, packing):
    """A hard link is a file: in the view, it reads (mount) and lands (extract, pull) with its
    target's bytes, the target left out; and the other way round."""
    import gzip
    real = os.urandom(70 * KiB)
    layer = _hardlinked_tar(real)
    layer = gzip.compress(layer, compresslevel=1) if packing == "tar+gzip" else layer
    ref = push_artifact(registry.address, f"views/hardlink-{packing.replace('+', '-')}",
                        [(layer, f"application/vnd.cncf.model.weight.v1.{packing}", {})])
    target = mounts.mount(ref, "--prefetch", "none", "--include", "v/")
    assert tree_of(target) == {"v/", "v/link.bin", "v/sym.bin"}
    assert read_direct(target / "v/link.bin") == real and read_direct(target / "v/sym.bin") == real
    other = mounts.mount(ref, "--prefetch", "none", "--exclude", "v/")
    assert tree_of(other) == {"w/", "w/real.bin"} and read_direct(other / "w/real.bin") == real
    out = tmp_path / "out"
    cli.run("extract", "--plain-http", ref, "-o", str(out), "--include", "link.bin")
    assert tree_of(out) == {"v/", "v/link.bin"} and (out / "v/link.bin").read_bytes() == real
    home, gone = Cli(tmp_path / "home"), CountingProxy(registry.port)
    via_gone = ref.replace(registry.address, gone.address)
    home.run("pull", "--plain-http", via_gone, "--include", "link.bin")
    gone.close()
    offline = mounts.mount(via_gone, "--prefetch", "none", "--include", "link.bin", cli=home)
    assert read_direct(offline / "v/link.bin") == real


def test_the_fstab_form_takes_a_pattern_starting_with_a_dash(model, mounts, cli):
    """``modelfs REF DIR -o include=...,exclude=...`` (what mount(8) and fstab run): one pattern
    per option, repeated; a pattern like '-draft.gguf' is a value, not a flag."""
    ref, files = model
    target = mounts.base / "fstab"
    target.mkdir(parents=True)
    cli.run(ref, str(target), "-o", "ro,plain_http,prefetch=none,include=*.gguf,exclude=-draft.gguf,"
            f"exclude={Q8}", timeout=120)
    mounts.active.append(target)
    assert tree_of(target) == set(Q4) and read_direct(target / Q4[0]) == files[Q4[0]]


def test_prefetch_of_a_view_outside_a_streamed_layer_fetches_it_once_to_list(registry, mounts, cli):
    """A tar+gzip layer only streaming lists is fetched to list it, a view or not; then prefetch
    takes the view's raw file and nothing else: never the layer again, never the file outside."""
    import gzip
    inside, wanted, outside = os.urandom(150 * KiB), os.urandom(100 * KiB), os.urandom(300 * KiB)
    packed = gzip.compress(_tar([("tok/a.json", b"{}"), ("tok/b.bin", inside)]), compresslevel=1)
    raw = "application/vnd.cncf.model.weight.v1.raw"
    ref = push_artifact(registry.address, "views/gzip-prefetch", [
        (packed, "application/vnd.cncf.model.weight.v1.tar+gzip", {}),
        (wanted, raw, {"org.cncf.model.filepath": "w.bin"}), (outside, raw, {"org.cncf.model.filepath": "x.bin"})])
    with counting_proxy(registry) as counting:
        target = mounts.mount(ref.replace(registry.address, counting.address), "--prefetch", "all", "--include", "w.bin")
        found = _status(cli, target)
        assert found["bytes_local"] == found["bytes_total"] == len(wanted) and tree_of(target) == {"w.bin"}
        time.sleep(0.5)  # anything else prefetch would start has started
        assert len(packed) + len(wanted) <= counting.downstream_bytes < len(packed) + len(wanted) + 64 * KiB
    assert read_direct(target / "w.bin") == wanted


MiB = 1 << 20


def _push_tar(registry_address: str, repository: str, tar: bytes, indexed: bool) -> str:
    """A hand-made artifact of one plain tar layer; ``indexed``: its manifest names a BLAKE3
    block index of it (annotation ``dev.modelfs.block-index``, as ``modelfs build`` writes)."""
    config = b'{"descriptor":{"name":"handmade"},"modelfs":{"type":"layers","diffIds":[]},"config":{}}'
    annotations = {}
    if indexed:
        hashes = {"sha256:" + hashlib.sha256(tar).hexdigest(): [
            blockindex.ALGORITHMS["blake3"](tar[i:i + MiB]).hex() for i in range(0, len(tar), MiB)]}
        annotations[blockindex.ANNOTATION] = push_blob(registry_address, repository, blockindex.encode(MiB, hashes))
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "artifactType": "application/vnd.cncf.model.manifest.v1+json",
                "config": {"mediaType": "application/vnd.cncf.model.config.v1+json",
                           "digest": push_blob(registry_address, repository, config), "size": len(config)},
                "layers": [{"mediaType": "application/vnd.cncf.model.weight.v1.tar",
                            "digest": push_blob(registry_address, repository, tar), "size": len(tar)}],
                "annotations": annotations}
    httpx.put(f"http://{registry_address}/v2/{repository}/manifests/v1", content=json.dumps(manifest),
              headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}).raise_for_status()
    return f"{registry_address}/{repository}:v1"


def _blocks_a_view_needs(tar: bytes, names: set[str]) -> int:
    """Bytes of the 1 MiB blocks holding the data of members ``names``, or any tar header,
    or the end of the archive (what listing reads): worked out from :mod:`tarfile`, not modelfs."""
    blocks: set[int] = set()
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        for info in archive:
            blocks.add(info.offset // MiB)
            if info.name in names and info.size:
                blocks.update(range(info.offset_data // MiB, (info.offset_data + info.size - 1) // MiB + 1))
        blocks.add(archive.offset // MiB)  # the end-of-archive blocks, read to end the listing
    return sum(len(tar[i * MiB:(i + 1) * MiB]) for i in blocks)


def test_the_blocks_byte_ranges_overlap():
    from modelfs.mount.viewblocks import blocks_of
    assert blocks_of([(512, MiB - 1024)], MiB, 5) == [0]  # inside one block
    assert blocks_of([(MiB - 1, 2)], MiB, 5) == [0, 1]  # straddling a boundary
    assert blocks_of([(0, 0), (3 * MiB, 0)], MiB, 5) == []  # empty files
    assert blocks_of([(4 * MiB, 10), (0, 1), (4 * MiB + 5, 1)], MiB, 5) == [0, 4]  # sorted, once each
    assert blocks_of([(4 * MiB, 5 * MiB)], MiB, 5) == [4]  # never past the last block


def test_prefetch_of_a_view_of_one_member_of_an_indexed_plain_tar_takes_only_its_blocks(registry, mounts, cli):
    """A plain tar whose blocks a trusted index vouches for has random access: a view of one
    of its members (a publisher packing every quantization in one tar layer) fetches the
    blocks it overlaps and those listing reads, never the others; each is checked as it lands."""
    q4, q8 = os.urandom(MiB - 1024), os.urandom(3 * MiB)  # q4 in block 0, q8 in 1-3, the tar's end in 4
    tar = _tar([("q4.gguf", q4), ("q8.gguf", q8)])
    ref = _push_tar(registry.address, "views/plain-multi", tar, indexed=True)
    needed = _blocks_a_view_needs(tar, {"q4.gguf"})
    with counting_proxy(registry) as counting:
        target = mounts.mount(ref.replace(registry.address, counting.address), "--prefetch", "all", "--include",
                              "q4.gguf")
        found = _status(cli, target)
        assert found["bytes_local"] == found["bytes_total"] == needed < len(q4) + 64 * KiB
        assert os.getxattr(target, "user.modelfs.cached") == b"1.0000"
        time.sleep(0.3)  # anything else prefetch would start has started
        assert needed <= counting.downstream_bytes < needed + 32 * KiB  # not the 3 MiB of q8
        assert read_direct(target / "q4.gguf") == q4
        assert counting.downstream_bytes < needed + 32 * KiB  # served from the cache


@pytest.mark.parametrize("index", ["none", "attached"])
def test_prefetch_of_a_view_of_a_plain_tar_without_an_index_the_manifest_names_takes_it_whole_and_says_why(
        registry, mounts, cli, index):
    """Without a block index nothing of a blob is served before it matched its digest whole,
    and an index only attached at the registry counts on the blob still being checked whole:
    either way a view of one member needs the whole layer, fetched once and checked; the
    daemon's log says why in one line."""
    from modelfs.logfile import daemon_log_path
    q4, q8 = os.urandom(100 * KiB), os.urandom(2 * MiB)  # the view needs blocks 0 and 2 of 3
    tar = _tar([("q4.gguf", q4), ("q8.gguf", q8)])
    ref = _push_tar(registry.address, f"views/plain-{index}", tar, indexed=False)
    if index == "attached":
        assert "Attached a block index" in cli.run("index", "attach", "--plain-http", ref).stdout
    with counting_proxy(registry) as counting:
        target = mounts.mount(ref.replace(registry.address, counting.address), "--prefetch", "all", "--include",
                              "q4.gguf")
        found = _status(cli, target)
        assert found["bytes_local"] == found["bytes_total"] == len(tar)
        assert read_direct(target / "q4.gguf") == q4 and tree_of(target) == {"q4.gguf"}
        assert len(tar) <= counting.downstream_bytes < len(tar) + 32 * KiB  # once
    digest = "sha256:" + hashlib.sha256(tar).hexdigest()
    log = Path(daemon_log_path(str(cli.cache_dir), str(target))).read_text()
    line = next(line for line in log.splitlines() if f"blob {digest}: the view needs " in line)
    assert line.endswith("but no block index the manifest names vouches for them one by one, so all of it is "
                         "fetched and checked whole")


def test_a_view_of_an_indexed_plain_tar_through_a_mirror_takes_only_its_blocks_each_checked(registry, mounts, cli,
                                                                                          tmp_path):
    """Through a mirror (untrusted by design) serving a flipped byte in q4, the view still
    takes only its blocks, in a mount and in ``extract``; each is matched against the index
    the manifest names, so the flipped block is refused and read again from the registry."""
    from hostile import HostileMirror
    q4, q8 = os.urandom(MiB - 1024), os.urandom(3 * MiB)
    tar = _tar([("q4.gguf", q4), ("q8.gguf", q8)])
    ref = _push_tar(registry.address, "views/plain-mirror", tar, indexed=True)
    needed = _blocks_a_view_needs(tar, {"q4.gguf"})
    forged = bytearray(tar)
    forged[4096] ^= 0xFF  # in q4's bytes
    with counting_proxy(registry) as direct, HostileMirror(registry.port, {
            "sha256:" + hashlib.sha256(tar).hexdigest(): bytes(forged)}) as mirror:
        fresh = Cli(tmp_path / "fresh")  # its own cache: extract reads the mirror, not the mount's blocks
        for home in (cli.home, fresh.home):
            config = home / "config" / "modelfs"
            config.mkdir(parents=True, exist_ok=True)
            (config / "config.toml").write_text(
                f'[registries."{direct.address}"]\nplain_http = true\nmirrors = ["http://{mirror.address}"]\n')
        target = mounts.mount(ref.replace(registry.address, direct.address), "--prefetch", "all", "--include",
                              "q4.gguf")
        found = _status(cli, target)
        assert found["bytes_local"] == found["bytes_total"] == needed
        assert read_direct(target / "q4.gguf") == q4 and mirror.forged_served >= 1
        assert found["integrity_errors"] >= 1 and direct.downstream_bytes < needed + 32 * KiB
        assert found["bytes_fetched"] <= 2 * needed  # from both: the forged block twice at most, never q8
        direct.reset()
        served = mirror.forged_served
        fresh.run("extract", "--plain-http", ref.replace(registry.address, direct.address), "-o",
                  str(tmp_path / "out"), "--include", "q4.gguf")
        assert (tmp_path / "out" / "q4.gguf").read_bytes() == q4 and mirror.forged_served > served
        assert direct.downstream_bytes < needed + 32 * KiB


def test_a_read_of_a_member_of_an_indexed_plain_tar_reads_ahead_only_within_the_view(registry, mounts):
    """Reading a viewed member to its end, the reader's read-ahead stops at the blocks the
    view needs, not in the next members of the tar (q8, outside the view). (On the old code
    listing's header reads left the blob's read-ahead streams such that this read read no
    further ahead; once listing no longer moves read-ahead, it fetched 1 MiB of q8.)"""
    q4, q8 = os.urandom(2 * MiB - 1024), os.urandom(3 * MiB)  # q4 in blocks 0-1, q8 in 2-4
    tar = _tar([("q4.gguf", q4), ("q8.gguf", q8)])
    ref = _push_tar(registry.address, "views/plain-readahead", tar, indexed=True)
    needed = _blocks_a_view_needs(tar, {"q4.gguf"})
    with counting_proxy(registry) as counting:
        target = mounts.mount(ref.replace(registry.address, counting.address), "--prefetch", "none", "--include",
                              "q4.gguf")
        assert read_direct(target / "q4.gguf") == q4
        time.sleep(0.3)  # read-ahead under way has started
        assert needed <= counting.downstream_bytes < needed + 32 * KiB < len(tar) - 2 * MiB


def test_pull_of_a_view_of_a_member_straddling_blocks_of_an_indexed_plain_tar_takes_only_its_blocks(
        registry, mounts, tmp_path):
    """``pull --include`` of one member of an indexed plain tar fetches, reads back and checks
    only the blocks the member straddles and those its listing reads; offline, that view
    mounts and pulls again from the cache; online, a mount of the whole model serves those
    blocks (each matched against the index when stored) and fetches only the others."""
    pad, q4, q8 = os.urandom(700 * KiB), os.urandom(MiB), os.urandom(3 * MiB)  # q4 straddles blocks 0 and 1
    tar = _tar([("pad.bin", pad), ("q4.gguf", q4), ("q8.gguf", q8)])
    ref = _push_tar(registry.address, "views/plain-pull", tar, indexed=True)
    needed = _blocks_a_view_needs(tar, {"q4.gguf"})
    assert needed == len(tar) - 2 * MiB  # blocks 2 and 3 hold only q8's bytes
    cli, gone = Cli(tmp_path / "home"), CountingProxy(registry.port)
    via_gone = ref.replace(registry.address, gone.address)
    cli.run("pull", "--plain-http", "--include", "q4.gguf", via_gone)
    assert needed <= gone.downstream_bytes < needed + 32 * KiB
    gone.close()
    offline = mounts.mount(via_gone, "--prefetch", "none", "--include", "q4.gguf", cli=cli)
    assert tree_of(offline) == {"q4.gguf"} and read_direct(offline / "q4.gguf") == q4
    assert "already complete there" in cli.run("pull", "--plain-http", "--include", "q4.gguf", via_gone).stdout
    cli.run("extract", "--plain-http", via_gone, "-o", str(tmp_path / "out"), "--include", "q4.gguf")  # offline too
    assert (tmp_path / "out" / "q4.gguf").read_bytes() == q4
    # the offline mount, still there, read q4 to its end: its read-ahead claimed no block of
    # q8 (outside its view) to fetch from a registry it cannot reach, which this mount waited on
    with counting_proxy(registry) as counting:
        whole = mounts.mount(ref.replace(registry.address, counting.address), "--prefetch", "none", cli=cli)
        started = time.monotonic()
        assert {name: read_direct(whole / name) for name in ("pad.bin", "q4.gguf", "q8.gguf")} == {
            "pad.bin": pad, "q4.gguf": q4, "q8.gguf": q8}
        assert time.monotonic() - started < 1
        assert len(tar) - needed <= counting.downstream_bytes < len(tar) - needed + 32 * KiB


def test_extract_of_a_view_of_an_indexed_plain_tar_takes_only_its_members_blocks(registry, cli, tmp_path):
    """``extract --include`` of a member of an indexed plain tar (q4, straddling blocks) and
    a hard link to it: the headers and q4's blocks are read by ranges, each checked against
    the index the manifest names; q8 is never downloaded. A view of the link alone gets
    q4's bytes too."""
    pad, q4, q8 = os.urandom(700 * KiB), os.urandom(MiB), os.urandom(3 * MiB)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in (("pad.bin", pad), ("q4.gguf", q4), ("q8.gguf", q8)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("q4-again.gguf")
        link.type, link.linkname = tarfile.LNKTYPE, "q4.gguf"
        archive.addfile(link)
    tar = buffer.getvalue()
    ref = _push_tar(registry.address, "views/plain-extract", tar, indexed=True)
    needed = _blocks_a_view_needs(tar, {"q4.gguf"})
    assert needed <= len(tar) - 2 * MiB
    out, link_only = tmp_path / "out", tmp_path / "link-only"
    with counting_proxy(registry) as counting:
        via = ref.replace(registry.address, counting.address)
        cli.run("extract", "--plain-http", via, "-o", str(out), "--include", "q4*.gguf")
        assert needed <= counting.downstream_bytes < needed + 32 * KiB  # not blocks 2-3, q8's alone
        counting.reset()
        cli.run("extract", "--plain-http", via, "-o", str(link_only), "--include", "q4-again.gguf")
        # q4's bytes read when its link comes, after q8: the block its header shares, twice
        assert counting.downstream_bytes < needed + MiB + 32 * KiB
    assert tree_of(out) == {"q4.gguf", "q4-again.gguf"} and (out / "q4-again.gguf").read_bytes() == q4
    assert (out / "q4.gguf").read_bytes() == q4
    assert tree_of(link_only) == {"q4-again.gguf"} and (link_only / "q4-again.gguf").read_bytes() == q4


def test_an_offline_pull_of_a_view_says_in_one_line_which_layer_it_cannot_list(registry, mounts, tmp_path):
    """Offline, a compressed layer only streaming lists must be in the cache whole; one a mount
    only streamed is not, and the pull says so in one line at once (it retried the registry
    for seconds and ended in a fetch error and log lines)."""
    import gzip
    wanted = os.urandom(50 * KiB)
    packed = gzip.compress(_tar([("tok/a.json", b"{}"), ("tok/b.bin", os.urandom(100 * KiB))]), compresslevel=1)
    ref = push_artifact(registry.address, "views/gzip-offline", [
        (packed, "application/vnd.cncf.model.weight.v1.tar+gzip", {}),
        (wanted, "application/vnd.cncf.model.weight.v1.raw", {"org.cncf.model.filepath": "w.bin"})])
    cli, gone = Cli(tmp_path / "home"), CountingProxy(registry.port)
    via_gone = ref.replace(registry.address, gone.address)
    target = mounts.mount(via_gone, "--prefetch", "none", "--include", "w.bin", cli=cli)
    assert read_direct(target / "w.bin") == wanted
    gone.close()
    started = time.monotonic()
    pulled = cli.run("pull", "--plain-http", "--include", "w.bin", via_gone, check=False, timeout=60)
    digest = "sha256:" + hashlib.sha256(packed).hexdigest()
    lines = pulled.stderr.strip().splitlines()
    assert pulled.returncode == 1 and len(lines) == 1 and lines[0].startswith("modelfs: error: cannot reach ")
    assert lines[0].endswith(f"; not in the cache: 1 blob ({digest[:19]}), so it cannot be pulled until the registry "
                             "answers")
    assert time.monotonic() - started < 3
