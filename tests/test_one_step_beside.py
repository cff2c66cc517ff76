"""One step beside this round's fixes: an extract merging into what --output holds, PAX
headers in a row and piled up, signature candidates of one model held together."""

import os
import tarfile

from conftest import make_tar, push_artifact

WEIGHT_TAR = "application/vnd.cncf.model.weight.v1.tar"


def test_a_symlink_through_a_link_already_in_output_is_refused(cli, registry, tmp_path):
    """Item 5, one step beside: the tree check sees one model, but --output is merged into.
    Model A holds `a/b/d -> ..` (inside: it is `a`). Model B holds `c -> a/b/d/../../secret`,
    lexically `a/secret` in B's own tree (B has no link a/b/d); extracted into the same --output
    it resolves through A's link to the directory above --output."""
    first = push_artifact(registry.address, "review/merge-a", [(make_tar([
        ("a/b", None, {"type": tarfile.DIRTYPE}),
        ("a/b/d", None, {"type": tarfile.SYMTYPE, "linkname": ".."})]), WEIGHT_TAR, {})])
    second = push_artifact(registry.address, "review/merge-b", [(make_tar([
        ("c", None, {"type": tarfile.SYMTYPE, "linkname": "a/b/d/../../secret"})]), WEIGHT_TAR, {})])
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "secret").write_bytes(b"TOPSECRET")
    out = sandbox / "out"
    cli.run("extract", "--plain-http", first, "--output", str(out))
    result = cli.run("extract", "--plain-http", second, "--output", str(out), check=False)
    resolved = os.path.realpath(out / "c")
    assert result.returncode == 1 or resolved.startswith(str(out) + os.sep), \
        f"extract left {out}/c resolving to {resolved} (outside --output); stderr: {result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "symlink 'c' -> 'a/b/d/../../secret' leaves --output" in lines[0], result.stderr
    assert not os.path.lexists(out / "c")


def _pax_header(records: bytes) -> bytes:
    """One PAX extended header ('x') holding ``records``, padded to 512 bytes."""
    import tarfile as _tarfile
    info = _tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = _tarfile.XHDTYPE, len(records)
    return info.tobuf(format=_tarfile.USTAR_FORMAT) + records + b"\0" * (-len(records) % 512)


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return f"{length}{body}".encode()


def _member(name: str, data: bytes) -> bytes:
    import tarfile as _tarfile
    info = _tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(format=_tarfile.USTAR_FORMAT) + data + b"\0" * (-len(data) % 512)


def test_extract_many_pax_headers_in_a_row_is_one_line(cli, registry, tmp_path):
    """Item 13, one step beside: not a deep path but 3,000 PAX headers before one member.
    Python's tarfile reads each next header recursively (RecursionError); the mount's own tar
    reader is iterative and serves the layer, so extract must either unpack it too or say one line."""
    tar = b"".join(_pax_header(_pax_record(f"k{i}", "v")) for i in range(3000)) + _member("w.bin", b"x") + b"\0" * 1024
    ref = push_artifact(registry.address, "review/paxchain", [(tar, WEIGHT_TAR, {})])
    out = tmp_path / "out"
    result = cli.run("extract", "--plain-http", ref, "--output", str(out), check=False)
    assert "Traceback" not in result.stderr and "RecursionError" not in result.stderr, result.stderr[-600:]
    assert result.returncode == 0 or len(result.stderr.strip().splitlines()) == 1, result.stderr[-600:]


def test_stream_pax_records_accumulate_without_bound():
    """A tar+gzip layer of consecutive PAX headers, each one record with a new key and a
    1 MiB value, before any member: the mount's tar reader keeps every record in `pending`
    (only a member clears it; MAX_MEMBERS does not count extended headers). 64 headers are
    ~64 KiB of gzip and hold 64 MiB in the daemon; 2 MB of gzip would hold 2 GB."""
    import gzip
    import tracemalloc

    import trio

    from modelfs.errors import ModelfsError
    from modelfs.formats.spec import Packing
    from modelfs.formats.tarindex import iter_members
    from modelfs.mount.stream import StreamSource

    value = "A" * ((1 << 20) - 64)
    tar = b"".join(_pax_header(_pax_record(f"k{i}", value)) for i in range(64)) + _member("w.bin", b"x") + b"\0" * 1024
    blob = gzip.compress(tar, 9)
    assert len(blob) < 1 << 20

    async def chunks():
        for at in range(0, len(blob), 1 << 16):
            yield blob[at:at + (1 << 16)]

    async def walk():
        source = StreamSource(chunks(), Packing.TAR_GZIP, "layer 0")
        try:
            return [member.path async for member in iter_members(source, "layer 0")]
        except ModelfsError:
            return None

    tracemalloc.start()
    try:
        trio.run(walk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 24 << 20, f"walking {len(blob):,} bytes of gzip held {peak / (1 << 20):.0f} MiB at peak"


def test_signature_candidates_held_in_memory_without_a_total_bound():
    """Issue 24's gather, one step beside the per-bundle cap: a manifest may list the same
    16 MiB blob as `model.sig` any number of times (the tree check that refuses duplicate
    paths runs after the signature check), and each copy is fetched and held at once. 40
    layers hold 640 MiB; a 8 MiB manifest lists tens of thousands."""
    from types import SimpleNamespace

    import trio

    from modelfs.errors import NotFoundError
    from modelfs.signing.bounded import MAX_BUNDLE_BYTES
    from modelfs.signing.evidence import gather

    class Client:
        fetched = 0

        async def get_blob(self, repository, digest, max_size, retry=None):
            Client.fetched += max_size
            return b"\0" * 16  # the bytes a hostile registry would send: up to max_size each, held at once

        def without_mirrors(self):
            return self

        async def referrers(self, repository, digest, retry=None):
            return None

        async def get_manifest(self, repository, target, retry=None):
            raise NotFoundError("none")

    layers = [SimpleNamespace(filepath="model.sig", digest="sha256:" + "1" * 64) for _ in range(40)]
    model = SimpleNamespace(manifest=SimpleNamespace(layers=layers),
                            reference=SimpleNamespace(repository="r", digest="sha256:" + "2" * 64))
    found = trio.run(gather, Client(), model)
    assert len(found) == 40
    assert Client.fetched <= 4 * MAX_BUNDLE_BYTES, \
        f"gather may hold {Client.fetched / (1 << 20):.0f} MiB of signature candidates at once"
