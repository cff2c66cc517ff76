"""OMS signatures that no layer digest stands for: a file inside a tar layer (plain, gzip),
another hash (blake2b), a file signed as shards. Each such file is served, pulled or
extracted only once its bytes hashed to the signed digest; one that differs is refused with
one line naming it and the signature, and nothing of it is served. Signed with the real
model-signing package, built and pushed by modelfs, read through real FUSE mounts."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import time
from pathlib import Path

import httpx
import pytest
from conftest import Cli
from direct import read_direct, read_direct_or_errno
from proxy import CountingProxy

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
model_signing = pytest.importorskip("model_signing")
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from test_signing import BUNDLE_TYPE, _attach, _model_dir, _one_line_error, _push, _write_key  # noqa: E402

from modelfs.logfile import daemon_log_path  # noqa: E402

MIB = 1 << 20
UNSIGNED_MODELFILE = "NAME signed\nCONFIG config.json\nMODEL *.safetensors\nDOC tokenizer.json\n"


def _sign(directory: Path, private: Path, out: Path, shards: bool = False) -> None:
    """model_signing's own API, as `model_signing sign key` does (Modelfile and model.sig excluded)."""
    hashing = model_signing.hashing.Config().set_ignored_paths(paths=["Modelfile", "model.sig"], ignore_git_paths=True)
    if shards:
        hashing = hashing.use_shard_serialization(shard_size=MIB, hashing_algorithm="blake2")
    model_signing.signing.Config().use_elliptic_key_signer(private_key=str(private)).set_hashing_config(
        hashing).sign(directory, out)


def _swap(directory: Path, offset: int) -> None:
    """One byte of the weight changed after signing: the artifact is honest, the signature is not about it."""
    with open(directory / "model.safetensors", "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


class World:
    """Models signed once, then built tar-packed (the signature attached as a referrer: a tar
    layer cannot carry model.sig readably) or raw with model.sig, honest and tampered."""

    def __init__(self, root: Path, registry) -> None:
        self.root, self.registry = root, registry
        self.cli = Cli(root / "home")
        self.release, self.release_pub = _write_key(root, "release", ec.generate_private_key(ec.SECP256R1()))
        self.dirs: dict[str, Path] = {}
        self.refs: dict[str, str] = {}
        for packing in ("tar", "tar+gzip"):
            good = self._tar_model(f"good-{packing}", packing)
            self._tar_model(f"swapped-{packing}", packing, tamper=lambda d: _swap(d, 3 * MIB // 2), like=good)
        self._tar_model("extra-tar", "tar", tamper=lambda d: (d / "extra.json").write_text("{}"), like=self.dirs["good-tar"],
                        modelfile=UNSIGNED_MODELFILE.replace("DOC tokenizer.json", "DOC tokenizer.json extra.json"))
        self._sharded("sharded")
        self._sharded("sharded-swapped", tamper=True)

    def _tar_model(self, name: str, packing: str, tamper=None, like: Path | None = None,
                   modelfile: str = UNSIGNED_MODELFILE) -> Path:
        name = name.replace("+", "-")  # a repository name
        directory = _model_dir(self.root, name, os.urandom(2 * MIB))
        if like is not None:
            for file in ("config.json", "tokenizer.json", "model.safetensors"):
                shutil.copy(like / file, directory / file)
        (directory / "Modelfile").write_text(modelfile)
        signature = self.root / f"{name}.sig"
        if like is None:
            _sign(directory, self.release, signature)
        else:
            shutil.copy(self.root / f"{like.name}.sig", signature)
        if tamper:
            tamper(directory)
        ref = f"{self.registry.address}/signfiles/{name}:v1"
        # no block index for the tampered ones: an OMS signature alone never lets a mount under enforce
        # use it anyway, and without it a pull under warn checks each blob whole, as enforce needs offline
        self.cli.run("build", "--packing", packing, *(["--no-block-index"] if tamper else []), "-t", ref, "-f",
                     str(directory / "Modelfile"), str(directory))
        self.cli.run("push", "--plain-http", ref)
        digest = httpx.head(f"http://{self.registry.address}/v2/signfiles/{name}/manifests/v1",
                            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).headers["docker-content-digest"]
        _attach(self.registry, f"signfiles/{name}", digest, [(signature.read_bytes(), BUNDLE_TYPE)])
        self.dirs[name], self.refs[name] = directory, ref
        return directory

    def zstd(self) -> str:
        """swapped-tar packed as tar+zstd (built on first use)."""
        if "swapped-tar-zstd" not in self.refs:
            self._tar_model("swapped-tar+zstd", "tar+zstd", tamper=lambda d: _swap(d, 3 * MIB // 2),
                            like=self.dirs["good-tar"])
        return self.refs["swapped-tar-zstd"]

    def emptied(self) -> str:
        """good-tar with tokenizer.json emptied after signing (built on first use), its signature copied."""
        if "emptied-tar" not in self.refs:
            self._tar_model("emptied-tar", "tar", tamper=lambda d: (d / "tokenizer.json").write_bytes(b""),
                            like=self.dirs["good-tar"])
        return self.refs["emptied-tar"]

    def _sharded(self, name: str, tamper: bool = False) -> None:
        directory = _model_dir(self.root, name, os.urandom(2 * MIB + 100))
        _sign(directory, self.release, directory / "model.sig", shards=True)
        if tamper:
            _swap(directory, MIB + 5)  # the second shard
        self.dirs[name], self.refs[name] = directory, _push(self.cli, self.registry, directory, f"signfiles/{name}")


@pytest.fixture(scope="module")
def world(tmp_path_factory, registry) -> World:
    return World(tmp_path_factory.mktemp("signing-files"), registry)


def _status_says(cli: Cli, expected: str) -> str:
    """``modelfs status`` once it says ``expected`` (the daemon writes it each second), or its last text."""
    for _ in range(30):
        out = cli.run("status").stdout
        if expected in out:
            break
        time.sleep(0.2)
    return out


def key(world: World) -> tuple[str, str]:
    return ("--key", str(world.release_pub))


@pytest.mark.parametrize("packing", ["tar", "tar+gzip"])
def test_file_in_a_tar_layer_is_served_pulled_and_extracted_once_its_signed_hash_matches(world, mounts, tmp_path,
                                                                                         packing):
    """Files packed in tar layers, signed by model-signing (sha256 of each file): verify says
    they are hashed when read; mount serves every file's exact bytes, pull and extract keep them."""
    ref, directory = world.refs[f"good-{packing}".replace("+", "-")], world.dirs[f"good-{packing}".replace("+", "-")]
    cli = Cli(tmp_path / "home")
    out = cli.run("verify", "--plain-http", *key(world), ref).stdout
    assert "OMS model signature by key" in out and "hashed when first read" in out, out
    target = mounts.mount(ref, *key(world), "--prefetch", "none", cli=cli)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert read_direct(target / name) == (directory / name).read_bytes(), name
    cli.run("pull", "--plain-http", *key(world), ref)
    cli.run("extract", "--plain-http", *key(world), ref, "-o", str(tmp_path / "out"))
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (directory / "model.safetensors").read_bytes()


@pytest.mark.parametrize("packing", ["tar", "tar+gzip"])
def test_tar_member_that_differs_from_its_signature_is_never_served_pulled_or_extracted(world, mounts, tmp_path,
                                                                                        packing):
    """The weight changed after signing, packed in an honest tar layer: the mount serves none
    of it (EIO, even for its first, unchanged MiB) while the other files are served; status
    and the log name it in one line; pull fails with that line and records nothing; extract
    refuses and leaves --output as it was."""
    name = f"swapped-{packing}".replace("+", "-")
    ref = world.refs[name]
    cli = Cli(tmp_path / "home")
    expected = "model.safetensors: sha256 differs from the signed statement (referrer sha256:"
    target = mounts.mount(ref, *key(world), "--prefetch", "none", cli=cli)
    assert read_direct(target / "config.json") == (world.dirs[name] / "config.json").read_bytes()
    assert read_direct_or_errno(target / "model.safetensors") == errno.EIO
    try:
        read_direct(target / "model.safetensors", 0, MIB)
        raise AssertionError("the first MiB of a file whose hash differs was served")
    except OSError as exc:
        assert exc.errno == errno.EIO
    assert expected in _status_says(cli, expected)
    log = Path(daemon_log_path(str(cli.cache_dir), str(target))).read_text()
    assert expected in log
    puller = Cli(tmp_path / "pull")  # the mount above recorded the model in its cache
    line = _one_line_error(puller.run("pull", "--plain-http", *key(world), ref, check=False))
    assert expected in line, line
    assert not list((puller.cache_dir / "models").glob("*")), "a refused pull is not recorded"
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    line = _one_line_error(cli.run("extract", "--plain-http", *key(world), ref, "-o", str(output), check=False))
    assert expected in line, line
    assert sorted(p.name for p in output.iterdir()) == ["keep.txt"]


def test_tar_layer_file_the_statement_does_not_list_is_refused(world, mounts, tmp_path):
    """Which files a tar layer holds only its listing tells: a file added after signing is
    refused once listed, by mount and extract alike."""
    ref = world.refs["extra-tar"]
    cli = Cli(tmp_path / "home")
    line = _one_line_error(mounts.refused(ref, *key(world), cli=cli))
    assert "extra.json is not listed" in line, line
    line = _one_line_error(cli.run("extract", "--plain-http", *key(world), ref, "-o", str(tmp_path / "out"), check=False))
    assert "extra.json is not listed" in line, line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_sharded_blake2_signature_serves_each_shard_once_it_matches(world, mounts, tmp_path):
    """model-signing's `shards` method with blake2b, 1 MiB shards of a raw 2 MiB weight: an
    honest model is served whole (pull too); in a tampered one a shard that matches is served
    until the one that differs is read: that is EIO, named in one line, and from then on the
    whole file is; pull refuses it."""
    cli = Cli(tmp_path / "home")
    good = mounts.mount(world.refs["sharded"], *key(world), cli=cli)
    assert read_direct(good / "model.safetensors") == (world.dirs["sharded"] / "model.safetensors").read_bytes()
    cli.run("pull", "--plain-http", *key(world), world.refs["sharded"])
    ref = world.refs["sharded-swapped"]
    target = mounts.mount(ref, *key(world), "--prefetch", "none", cli=cli)
    weight = (world.dirs["sharded-swapped"] / "model.safetensors").read_bytes()
    assert read_direct(target / "model.safetensors", 0, MIB) == weight[:MIB]
    for offset in (MIB, 0):  # the shard that differs; then none of the file, its matching shards included
        try:
            read_direct(target / "model.safetensors", offset, 4096)
            raise AssertionError(f"bytes at {offset} of a file with a shard that differs were served")
        except OSError as exc:
            assert exc.errno == errno.EIO
    expected = "model.safetensors: bytes 1,048,576-2,097,152: blake2b differs from the signed statement"
    assert expected in _status_says(cli, expected)
    assert expected in _one_line_error(cli.run("pull", "--plain-http", *key(world), ref, check=False))


def test_statement_checks_are_typed_and_cover_each_file_exactly():
    """Unit: the verdict's pending checks for another hash and for shards; shards that leave a
    tail unsigned, or an algorithm modelfs cannot hash, do not cover the file."""
    import hashlib

    from modelfs.formats.spec import Descriptor, Manifest
    from modelfs.signing.filechecks import WHOLE, Shard, tiling_problem
    from modelfs.signing.statement import _files
    raw = "application/vnd.cncf.model.weight.v1.raw"
    tar = "application/vnd.cncf.model.weight.v1.tar"
    data = os.urandom(2500)
    layers = [Descriptor(raw, "sha256:" + hashlib.sha256(data).hexdigest(), len(data),
                         {"org.cncf.model.filepath": "w.bin"}),
              Descriptor(tar, "sha256:" + "0" * 64, 5000, {"org.cncf.model.filepath": "t.bin"})]
    manifest = Manifest("application/vnd.oci.image.manifest.v1+json", Descriptor("x", "sha256:" + "1" * 64, 2), layers,
                        "", {})
    b3 = "ab" * 32
    coverage = _files({"w.bin:0:1000": ("sha256-sharded-1000", "aa" * 32), "w.bin:1000:2500": ("sha256-sharded-1000",
                                                                                               "bb" * 32),
                       "t.bin": ("blake3", b3)}, manifest, "model.sig")
    assert not coverage.uncovered and not coverage.contradictions and coverage.listed_later
    assert coverage.checks == {"w.bin": (Shard(0, 1000, "sha256", "aa" * 32), Shard(1000, 2500, "sha256", "bb" * 32)),
                               "t.bin": (Shard(0, WHOLE, "blake3", b3),)}
    short = _files({"w.bin:0:1000": ("sha256-sharded-1000", "aa" * 32)}, manifest, "model.sig")
    assert "w.bin: its signed shards end at byte 1,000, the file at 2,500" in short.contradictions
    odd = _files({"w.bin": ("md5", "aa" * 16)}, manifest, "model.sig")
    assert any("w.bin is signed with md5, which modelfs does not read" in u for u in odd.uncovered)
    assert tiling_problem((Shard(0, WHOLE, "sha256", "aa" * 32),), 10) is None


def test_pull_under_warn_says_so_and_an_offline_pull_under_enforce_still_checks(world, tmp_path):
    """Under warn, pull keeps a model whose tar member differs from its signature and says so
    in one line; a later pull under enforce while the registry cannot be reached (every blob
    cached) still hashes that file from the cache and refuses."""
    proxy = CountingProxy(world.registry.port)
    cli = Cli(tmp_path / "home")
    ref = world.refs["swapped-tar"].replace(world.registry.address, proxy.address)
    expected = "model.safetensors: sha256 differs from the signed statement"
    try:
        kept = cli.run("pull", "--plain-http", "--signatures", "warn", *key(world), ref)
        assert expected in kept.stderr and "Pulled" in kept.stdout, kept.stderr
    finally:
        proxy._server.shutdown(socket.SHUT_RDWR)  # wakes its accept(): the port refuses from now on
        proxy.close()
    line = _one_line_error(cli.run("pull", "--plain-http", *key(world), ref, check=False))
    assert expected in line, line


def test_gate_runs_one_check_for_concurrent_readers_and_remembers_it():
    """Unit, with a counting reader: three reads of a signed file at once cause one read of
    its bytes; later reads none; a range that differs is refused under enforce (every read of
    the file after it too) and served under warn."""
    import hashlib

    import trio

    from modelfs.errors import SignatureError
    from modelfs.mount.filecheck import FileGate
    from modelfs.mount.tree import Node
    from modelfs.signing.filechecks import FileChecks, Shard

    data = os.urandom(3 * MIB + 10)

    class Reader:
        reads = 0

        async def read_view(self, offset: int, size: int) -> bytes:
            Reader.reads += 1
            await trio.sleep(0.001)
            return data[offset:offset + size]

    def gate(mode: str, second: str) -> FileGate:
        shards = (Shard(0, MIB, "sha256", hashlib.sha256(data[:MIB]).hexdigest()),
                  Shard(MIB, len(data), "blake2b", second))
        checks = FileChecks({"w.bin": shards}, frozenset(), frozenset({"w.bin"}), "model.sig in the artifact", mode)
        return FileGate(checks, {2: "w.bin"})

    node = Node(2, "w.bin", "file", 0o644, 0, size=len(data))
    honest = hashlib.blake2b(data[MIB:]).hexdigest()

    async def main() -> None:
        checked = gate("enforce", honest)
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(checked.admit, node, Reader(), 0, len(data))
        assert Reader.reads == 4  # 1 + 3 MiB + 10 bytes, in 1 MiB reads, once
        await checked.admit(node, Reader(), 5, 100)
        assert Reader.reads == 4
        refused = gate("enforce", "00" * 64)
        await refused.admit(node, Reader(), 0, 100)  # the first shard matches: served
        for _ in range(2):
            with pytest.raises(SignatureError, match=r"w.bin: bytes 1,048,576-3,145,738: blake2b differs from the "
                                                     r"signed statement \(model.sig in the artifact\)"):
                await refused.admit(node, Reader(), 0, len(data))
        with pytest.raises(SignatureError):
            await refused.admit(node, Reader(), 0, 100)  # nothing more of that file
        warned = gate("warn", "00" * 64)
        await warned.admit(node, Reader(), 0, len(data))
        assert len(warned.failures) == 1

    trio.run(main)


def test_a_view_of_a_signed_model_is_judged_whole_and_serves_only_its_files(world, mounts, tmp_path):
    """The statement signs the whole model; a view leaves files out, which are neither
    "missing" nor read: mount, pull and extract of a view under enforce serve the view's files,
    each checked, and a tampered file inside the view is still refused."""
    ref, directory = world.refs["sharded"], world.dirs["sharded"]
    cli = Cli(tmp_path / "home")
    view = ("--include", "model.safetensors")
    target = mounts.mount(ref, *key(world), *view, "--prefetch", "none", cli=cli)
    assert sorted(os.listdir(target)) == ["model.safetensors"]
    assert read_direct(target / "model.safetensors") == (directory / "model.safetensors").read_bytes()
    cli.run("pull", "--plain-http", *key(world), *view, ref)
    cli.run("extract", "--plain-http", *key(world), *view, ref, "-o", str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path / "out")) == ["model.safetensors"]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (directory / "model.safetensors").read_bytes()
    refused = cli.run("extract", "--plain-http", *key(world), *view, world.refs["sharded-swapped"], "-o",
                      str(tmp_path / "bad"), check=False)
    assert refused.returncode != 0 and "differs from the signed statement" in refused.stderr, refused.stderr
    assert not (tmp_path / "bad" / "model.safetensors").exists()


def test_signed_file_emptied_in_its_tar_layer_is_refused_at_open(world, mounts, tmp_path):
    """A registry that empties a signed tar member: the kernel never asks the daemon to read
    a file of size 0, so the check of its signed hash runs when it is opened: EIO, with the
    one line naming it, rather than an empty file where the statement signs its bytes."""
    ref = world.emptied()
    cli = Cli(tmp_path / "home")
    target = mounts.mount(ref, *key(world), "--prefetch", "none", cli=cli)
    assert read_direct(target / "config.json") == (world.dirs["good-tar"] / "config.json").read_bytes()
    with pytest.raises(OSError) as caught:
        (target / "tokenizer.json").read_bytes()
    assert caught.value.errno == errno.EIO
    expected = "tokenizer.json: sha256 differs from the signed statement"
    assert expected in _status_says(cli, expected)


def _pread(fd: int, offset: int, size: int) -> bytes | int:
    """A read through the kernel's page cache (no O_DIRECT), or its errno."""
    try:
        return os.pread(fd, size, offset)
    except OSError as exc:
        return exc.errno or -1


def test_refused_file_leaves_the_kernels_pages_too(world, mounts, tmp_path):
    """A file whose first shard matched was read through the page cache; its second shard
    then differs: from then on no read of the file is served, the kernel's pages of the
    first shard included (a loader holding it open, or mapped, must not keep reading it);
    a new open is refused."""
    cli = Cli(tmp_path / "home")
    target = mounts.mount(world.refs["sharded-swapped"], *key(world), "--prefetch", "none", cli=cli)
    weight = (world.dirs["sharded-swapped"] / "model.safetensors").read_bytes()
    fd = os.open(target / "model.safetensors", os.O_RDONLY)  # held open, as a loader does
    try:
        assert _pread(fd, 0, 4096) == weight[:4096]
        with pytest.raises(OSError) as caught:
            read_direct(target / "model.safetensors", MIB, 4096)
        assert caught.value.errno == errno.EIO
        for _ in range(30):  # the pages are dropped by a task of the daemon, at once
            got = _pread(fd, 0, 4096)
            if got == errno.EIO:
                break
            time.sleep(0.1)
        assert got == errno.EIO, "the kernel still serves pages of a file refused for its signature"
    finally:
        os.close(fd)
    with pytest.raises(OSError) as caught:
        os.open(target / "model.safetensors", os.O_RDONLY)
    assert caught.value.errno == errno.EIO


def test_lazy_enforce_mount_does_not_serve_blocks_another_process_left_unchecked(world, mounts, tmp_path):
    """Another process (a lazy mount of a mirror that served wrong bytes) left an unchecked
    block of a sharded file in the shared cache. A mount under enforce with --verify lazy
    must neither serve it nor hash it and blame the signature: a signed file's blob is
    checked whole there (lazy serves what a refetch or another process brings, after the
    range's signed hash passed), so the file reads right."""
    from modelfs.storage.cache import BlockCache

    cli = Cli(tmp_path / "home")
    weight = (world.dirs["sharded"] / "model.safetensors").read_bytes()
    digest = "sha256:" + __import__("hashlib").sha256(weight).hexdigest()
    cache = BlockCache(str(cli.cache_dir))
    try:
        entry = cache.entry(digest, len(weight))
        assert entry.write_block(0, bytes(len(weight[:entry.block_size]))) is not None  # zeros, stored unverified
    finally:
        cache.close()
    target = mounts.mount(world.refs["sharded"], *key(world), "--prefetch", "none", "--verify", "lazy", cli=cli)
    assert read_direct(target / "model.safetensors") == weight


def test_gate_finds_a_reads_shards_without_walking_all_of_them():
    """Unit: a file signed as 200,000 shards (the statement's cap) whose shards all passed:
    a read costs a lookup, not a walk over every shard (200 reads: 10 s before, 2 ms now)."""
    import trio

    from modelfs.mount.filecheck import FileGate
    from modelfs.mount.tree import Node
    from modelfs.signing.filechecks import FileChecks, Shard

    count, size = 200_000, 4096
    shards = tuple(Shard(i * size, (i + 1) * size, "sha256", "00" * 32) for i in range(count))
    gate = FileGate(FileChecks({"w.bin": shards}, frozenset(), frozenset({"w.bin"}), "model.sig", "enforce"),
                    {2: "w.bin"})
    gate._passed.update(("w.bin", i) for i in range(count))
    node = Node(2, "w.bin", "file", 0o644, 0, size=count * size)

    async def main() -> float:
        started = time.monotonic()
        for i in range(200):
            await gate.admit(node, None, (i * 197 % count) * size, 128 << 10)  # type: ignore[arg-type]
        return time.monotonic() - started

    assert trio.run(main) < 0.5


def test_statement_listing_a_file_twice_with_different_digests_is_refused():
    """Unit: an OMS statement naming one file twice (as is, or after ./ and // are
    normalised) with two digests is ambiguous: it vouches for neither, rather than for
    whichever came last."""
    import hashlib

    from modelfs.formats.spec import Descriptor, Manifest
    from modelfs.signing.bounded import Malformed
    from modelfs.signing.statement import OMS_V1, _files, _oms_resources
    data = os.urandom(100)
    good, bad = hashlib.sha256(data).hexdigest(), "11" * 32

    def statement(entries: list[tuple[str, str]]) -> dict:
        resources = [{"name": name, "algorithm": "sha256", "digest": digest} for name, digest in entries]
        root = hashlib.sha256(b"".join(bytes.fromhex(d) for _, d in entries)).hexdigest()
        return {"subject": [{"digest": {"sha256": root}}], "predicate": {"resources": resources}}

    with pytest.raises(Malformed, match="w.bin.* twice"):
        _oms_resources(statement([("w.bin", bad), ("w.bin", good)]), OMS_V1, "model.sig")
    layers = [Descriptor("application/vnd.cncf.model.weight.v1.raw", "sha256:" + good, len(data),
                         {"org.cncf.model.filepath": "w.bin"})]
    manifest = Manifest("application/vnd.oci.image.manifest.v1+json", Descriptor("x", "sha256:" + "1" * 64, 2), layers,
                        "", {})
    coverage = _files(_oms_resources(statement([("./w.bin", bad), ("w.bin", good)]), OMS_V1, "m"), manifest, "m")
    assert any("w.bin is listed twice" in c for c in coverage.contradictions), coverage


def test_offline_mount_of_a_pulled_model_still_hashes_its_signed_files(world, mounts, tmp_path):
    """pull under warn kept a model whose tar member differs from its signature; a mount
    under enforce while the registry cannot be reached (the verdict and every blob cached)
    runs the same gate: the other files are served, that one is EIO."""
    proxy = CountingProxy(world.registry.port)
    cli = Cli(tmp_path / "home")
    ref = world.refs["swapped-tar"].replace(world.registry.address, proxy.address)
    try:
        cli.run("pull", "--plain-http", "--signatures", "warn", *key(world), ref)
    finally:
        proxy._server.shutdown(socket.SHUT_RDWR)
        proxy.close()
    target = mounts.mount(ref, *key(world), "--prefetch", "none", "--timeout", "2", cli=cli)
    assert read_direct(target / "config.json") == (world.dirs["swapped-tar"] / "config.json").read_bytes()
    assert read_direct_or_errno(target / "model.safetensors") == errno.EIO


def test_a_statement_of_many_shards_is_judged_in_linear_time():
    """Unit: one file signed as 20,000 shards: the verdict's checks are merged and the
    file's shards judged in well under a second (merging walked a list per shard: 18 s for
    these, half an hour for the statement's cap of 200,000)."""
    from modelfs.signing.filechecks import Shard, merge
    from modelfs.signing.statement import Coverage

    count = 20_000
    shards = tuple(Shard(i * 10, (i + 1) * 10, "blake2b", "00" * 64) for i in range(count))
    started = time.monotonic()
    checks = merge([("model.sig", Coverage(checks={"w.bin": shards}, signed=frozenset({"w.bin"})))], "enforce", "m")
    assert checks is not None and len(checks.shards("w.bin")) == count
    assert checks.judge_listing({"w.bin": count * 10}) == []
    assert time.monotonic() - started < 1.0


def test_extract_of_a_tar_zstd_layer_hashes_its_files(world, tmp_path):
    """extract of a tar+zstd layer whose member differs from its signature refuses it, with
    that line, and leaves --output as it was (the staged files are hashed, whatever the packing)."""
    cli = Cli(tmp_path / "home")
    line = _one_line_error(cli.run("extract", "--plain-http", *key(world), world.zstd(), "-o", str(tmp_path / "out"),
                                   check=False))
    assert "model.safetensors: sha256 differs from the signed statement" in line, line
    assert not (tmp_path / "out").exists()


def test_gate_touches_the_shards_a_read_spans_at_any_alignment():
    """Unit: shards of odd sizes (not a block's multiple), zero-length ones, an empty file,
    and overlapping shards (served only under warn): a read is checked against exactly the
    shards it touches, one spanning three shards against all three."""
    from modelfs.mount.filecheck import _Spans
    from modelfs.signing.filechecks import WHOLE, Shard

    def spans(*bounds: tuple[int, int], size: int) -> _Spans:
        return _Spans(tuple(Shard(a, b, "sha256", "") for a, b in bounds), size)

    odd = spans((0, 1000), (1000, 1000), (1000, 2500), (2500, 4097), size=4097)
    assert list(odd.touched(999, 2600)) == [0, 1, 2, 3]
    assert list(odd.touched(1000, 1001)) == [1, 2]
    assert list(odd.touched(4096, 4097)) == [3]
    assert list(odd.touched(4097, 8192)) == []  # at its end: nothing
    assert list(spans((0, WHOLE), size=0).touched(0, 0)) == [0]  # an empty file's one shard
    overlapping = spans((0, 3000), (1000, 2000), (2000, 4097), size=4097)
    assert list(overlapping.touched(2500, 2600)) == [0, 2]


def test_a_file_name_with_a_newline_keeps_the_refusal_on_one_line():
    """Unit: a registry names a tar member or a layer's file path with a newline: the
    refusal naming it stays one line (the name shown quoted), and forges no log line."""
    from modelfs.errors import SignatureError
    from modelfs.formats.spec import Descriptor, Manifest
    from modelfs.signing.filechecks import FileChecks
    from modelfs.signing.statement import _files

    checks = FileChecks({}, frozenset(), frozenset(), "model.sig", "enforce", "reg/m:v1", True)
    with pytest.raises(SignatureError) as caught:
        checks.judge_listing({"w.bin\nINFO all files verified": 10})
    assert "\n" not in str(caught.value) and "'w.bin\\nINFO all files verified' is not listed" in str(caught.value)
    layers = [Descriptor("application/vnd.cncf.model.weight.v1.raw", "sha256:" + "2" * 64, 5,
                         {"org.cncf.model.filepath": "x\ny.bin"})]
    manifest = Manifest("application/vnd.oci.image.manifest.v1+json", Descriptor("x", "sha256:" + "1" * 64, 2), layers,
                        "", {})
    coverage = _files({}, manifest, "model.sig")
    assert coverage.uncovered and all("\n" not in line for line in coverage.uncovered), coverage.uncovered


def test_two_signers_cutting_one_file_differently_both_count_and_both_are_checked():
    """Unit: two counting statements sign a tar member, one whole (sha256), one as blake2b
    shards: each covers the file exactly, so the listing is not refused (it was: their
    union "did not cover it exactly"), and the gate checks every shard of both."""
    import hashlib

    import trio

    from modelfs.errors import SignatureError
    from modelfs.mount.filecheck import FileGate
    from modelfs.mount.tree import Node
    from modelfs.signing.filechecks import WHOLE, Shard, merge
    from modelfs.signing.statement import Coverage

    data = os.urandom(3000)

    def checks(second: str):
        whole = Coverage(checks={"t.bin": (Shard(0, WHOLE, "sha256", hashlib.sha256(data).hexdigest()),)},
                         signed=frozenset({"t.bin"}), listed_later=True)
        shards = Coverage(checks={"t.bin": (Shard(0, 1000, "blake2b", hashlib.blake2b(data[:1000]).hexdigest()),
                                            Shard(1000, 3000, "blake2b", second))},
                          signed=frozenset({"t.bin"}), listed_later=True)
        merged = merge([("a.sig", whole), ("b.sig", shards)], "enforce", "m")
        assert merged is not None and merged.judge_listing({"t.bin": len(data)}) == []
        return merged

    class Reader:
        async def read_view(self, offset: int, size: int) -> bytes:
            return data[offset:offset + size]

    node = Node(2, "t.bin", "file", 0o644, 0, size=len(data))

    async def main() -> None:
        await FileGate(checks(hashlib.blake2b(data[1000:]).hexdigest()), {2: "t.bin"}).admit(node, Reader(), 0, 3000)
        with pytest.raises(SignatureError, match="bytes 1,000-3,000: blake2b differs"):
            await FileGate(checks("00" * 64), {2: "t.bin"}).admit(node, Reader(), 2500, 2600)

    trio.run(main)


def test_a_shard_bound_of_thousands_of_digits_is_one_line_not_a_crash():
    """Unit: a statement (by a signer the policy names) whose shard bounds run to 5,000
    digits, or whose algorithm holds a newline: the file is not covered, said in one line
    each (int() of that many digits raised ValueError, which no caller expected)."""
    import hashlib

    from modelfs.formats.spec import Descriptor, Manifest
    from modelfs.signing.statement import _files

    layers = [Descriptor("application/vnd.cncf.model.weight.v1.raw", "sha256:" + "2" * 64, 5,
                         {"org.cncf.model.filepath": "w.bin"}),
              Descriptor("application/vnd.cncf.model.weight.v1.raw", "sha256:" + "3" * 64, 5,
                         {"org.cncf.model.filepath": "v.bin"})]
    manifest = Manifest("application/vnd.oci.image.manifest.v1+json", Descriptor("x", "sha256:" + "1" * 64, 2), layers,
                        "", {})
    coverage = _files({"w.bin:0:" + "9" * 5000: ("sha256-sharded-1", hashlib.sha256(b"").hexdigest()),
                       "v.bin": ("md5\nforged", "aa" * 16)}, manifest, "model.sig")
    lines = coverage.uncovered + coverage.contradictions
    assert "w.bin is not listed" in lines and all("\n" not in line and len(line) < 400 for line in lines), lines
