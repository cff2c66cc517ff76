"""One step beside this session's changes (read-back on the serving loop, blocks kept for a
reader's stream, views of plain tar layers by blocks): a hostile mirror, another process
sharing the cache, an unlucky operator."""

from __future__ import annotations

import hashlib
import os

from conftest import Cli
from test_views import MiB, _blocks_a_view_needs, _push_tar, _tar, counting_proxy, tree_of


def _mirrored(cli: Cli, registry_address: str, mirror_address: str) -> None:
    config = cli.home / "config" / "modelfs"
    config.mkdir(parents=True, exist_ok=True)
    (config / "config.toml").write_text(
        f'[registries."{registry_address}"]\nplain_http = true\nmirrors = ["http://{mirror_address}"]\n')


def test_extract_of_a_view_through_a_mirror_cutting_its_ranges_short_reads_them_from_the_registry(registry,
                                                                                                  tmp_path):
    """A mirror (untrusted) answering each range of an indexed plain tar with fewer bytes
    than asked (a P2P proxy cut off mid-piece) is routed around as a forged byte is: the
    range is read once more from the registry itself, and ``extract --include`` writes the
    member's exact bytes. (It failed at once, "asked bytes ..., got N bytes".)"""
    from hostile import HostileMirror
    pad, q4, q8 = os.urandom(700 * 1024), os.urandom(MiB), os.urandom(3 * MiB)  # q4 straddles blocks 0 and 1
    tar = _tar([("pad.bin", pad), ("q4.gguf", q4), ("q8.gguf", q8)])
    ref = _push_tar(registry.address, "beside/short-mirror", tar, indexed=True)
    needed = _blocks_a_view_needs(tar, {"q4.gguf"})
    cut = tar[:MiB + 4096]  # every range past here comes back short
    with counting_proxy(registry) as direct, HostileMirror(registry.port, {
            "sha256:" + hashlib.sha256(tar).hexdigest(): cut}) as mirror:
        cli = Cli(tmp_path / "home")
        _mirrored(cli, direct.address, mirror.address)
        cli.run("extract", "--plain-http", ref.replace(registry.address, direct.address), "-o",
                str(tmp_path / "out"), "--include", "q4.gguf", timeout=30)
        assert mirror.forged_served >= 1 and direct.downstream_bytes < needed + 32 * 1024
    assert tree_of(tmp_path / "out") == {"q4.gguf"} and (tmp_path / "out" / "q4.gguf").read_bytes() == q4


def test_extract_through_a_mirror_serving_a_wrong_blob_reads_it_again_from_the_registry(registry, tmp_path):
    """The twin of the one above for a blob ``extract`` reads whole: a mirror serving a flipped
    byte of one blob and cutting another short makes each be read once more from the
    registry itself, as a mount's reads do, instead of failing the extract ("has N bytes not
    matching its digest")."""
    from conftest import push_artifact
    from hostile import HostileMirror
    flipped, cut = os.urandom(MiB + 77), os.urandom(MiB + 99)
    ref = push_artifact(registry.address, "beside/wrong-mirror", [
        (flipped, "application/vnd.cncf.model.weight.v1.raw", {"org.cncf.model.filepath": "a.bin"}),
        (cut, "application/vnd.cncf.model.weight.v1.raw", {"org.cncf.model.filepath": "b.bin"})])
    forged = bytearray(flipped)
    forged[5] ^= 0xFF
    with HostileMirror(registry.port, {"sha256:" + hashlib.sha256(flipped).hexdigest(): bytes(forged),
                                       "sha256:" + hashlib.sha256(cut).hexdigest(): cut[:1000]}) as mirror:
        cli = Cli(tmp_path / "home")
        _mirrored(cli, registry.address, mirror.address)
        cli.run("extract", "--plain-http", ref, "-o", str(tmp_path / "out"), timeout=30)
        assert mirror.forged_served >= 1
    assert (tmp_path / "out" / "a.bin").read_bytes() == flipped and (tmp_path / "out" / "b.bin").read_bytes() == cut


def test_the_view_spans_of_a_tar_of_many_members_take_linear_time():
    """A view keeping 20,000 of a 40,000-member plain tar (listing noted a read per header,
    as it does for members over 64 KiB): the blocks the view needs are worked out in well
    under a second, on the serving loop at mount. (Each kept file copied the list of every
    listing read: 20,000 x 40,000 tuples, seconds of CPU before the mount answered.)"""
    import time

    from modelfs.formats.spec import Descriptor, Packing
    from modelfs.formats.view import View
    from modelfs.mount.tree import REGULAR, Layer, Tree
    members = 40_000
    descriptor = Descriptor("application/vnd.cncf.model.weight.v1.tar", "sha256:" + "ab" * 32, members * 128 * 1024)
    layer, tree = Layer(descriptor, Packing.TAR, "layer 0"), Tree(0, max_nodes=2 * members)
    for i in range(members):
        tree.add(f"d/f{i}.{'json' if i % 2 else 'bin'}", "layer 0", kind=REGULAR, mode=0o644, mtime_ns=0,
                 size=1000, layer=layer, offset=i * 128 * 1024 + 512)
    tree.listed[descriptor.digest] = [(i * 128 * 1024, 64 * 1024) for i in range(members)]
    tree.cut(View(include=("*.json",)))
    started = time.process_time()
    spans = tree.view_spans()
    took = time.process_time() - started
    assert spans is not None and len(spans[descriptor.digest]) == members + members // 2
    assert took < 0.5, took
