"""One step beside this session's changes (read-back on the serving loop, blocks kept for a
reader's stream, views of plain tar layers by blocks): a hostile mirror, another process
sharing the cache, an unlucky operator."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio
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


async def _damaged_read_back(tmp_path, threads: int) -> None:
    """Body of the next test: the blob cached by one run, a byte of block 3 flipped on disk,
    the copies in memory gone. While that run's task is still finishing (past its last
    block, its slot given back), a read finds block 3 damaged, drops it and claims it again;
    the run then ends, and the new fetch of block 3 must be left to the run that owns it."""
    import trio

    from modelfs.mount.fetcher import Fetcher, FetchPolicy
    from modelfs.storage.cache import BlockCache
    from modelfs.storage.window import shared_window
    from modelfs.testing.registry import FakeRegistry
    from modelfs.testing.registry import index_of as block_index_of
    bs = 4096
    fake, data = FakeRegistry(), os.urandom(8 * bs)
    digest = fake.add_blob(data)
    cache = BlockCache(str(tmp_path), block_size=bs)
    first_run_ends, second_fetch = trio.Event(), trio.Event()
    second_started = trio.Event()
    async with trio.open_nursery() as nursery:
        fetcher = Fetcher(cache, fake, "org/model", nursery, FetchPolicy(workers=2, readback_threads=threads),
                          index=block_index_of(data, block_size=bs, vouched=True), range_reader=fake)
        transfers = fetcher.blobs.runs.transfers
        held, fetch, fetches = transfers.slots.held, transfers.fetch, [0]

        class Lingering:  # the first run's slot: given back, then its task waits before its end
            def __init__(self, foreground: bool = True) -> None:
                self.inner, self.first = held(foreground), fetches[0] == 0

            async def __aenter__(self):
                return await self.inner.__aenter__()

            async def __aexit__(self, *exc):
                result = await self.inner.__aexit__(*exc)
                if self.first:
                    await first_run_ends.wait()
                return result

        async def gated(*args, **kwargs):
            fetches[0] += 1
            if fetches[0] > 1:  # the fetch of block 3 again: held until the first run has ended
                second_started.set()
                await second_fetch.wait()
            return await fetch(*args, **kwargs)

        transfers.slots.held, transfers.fetch = Lingering, gated
        reader = fetcher.reader(digest, len(data))
        assert reader.readbacks.on_loop is (threads == 0)
        assert await reader.read(0, len(data)) == data
        with open(reader.blob.entry.data_path, "r+b") as handle:  # blocks are stored at index * block size
            handle.seek(3 * bs + 10)
            byte = handle.read(1)
            handle.seek(3 * bs + 10)
            handle.write(bytes([byte[0] ^ 1]))
        fetcher.recent.drop(digest)
        shared_window().clear()
        got: list[object] = []
        answered = trio.Event()

        async def read_again() -> None:
            try:
                got.append(bytes(await reader.read_view(3 * bs - 5, 10)))  # straddling blocks 2 and 3
            except Exception as exc:
                got.append(exc)
            answered.set()

        nursery.start_soon(read_again)
        await second_started.wait()
        first_run_ends.set()
        await trio.sleep(0.05)
        second_fetch.set()
        await answered.wait()
        assert got == [data[3 * bs - 5:3 * bs + 5]] and fetcher.stats.damaged_blocks == 1
        assert await reader.read(0, len(data)) == data
        nursery.cancel_scope.cancel()
    fetcher.close()
    cache.close()


@pytest.mark.parametrize("threads", [0, 4], ids=["on-loop", "on-workers"])
async def test_a_damaged_block_dropped_just_after_its_run_is_fetched_again_on_either_side(tmp_path, threads):
    """A run's end fails only the blocks it still owes, never a block it delivered that was
    since dropped (read back damaged) and claimed again by another run: that read was failed
    "fetch cancelled" instead of served (on the loop, a read back follows its run closely)."""
    with trio.fail_after(10):
        await _damaged_read_back(tmp_path, threads)


def test_a_mirror_answering_a_wrong_size_for_a_layer_does_not_refuse_the_mount(registry, mounts, cli):
    """The mount HEADs every layer to refuse a manifest that lies about a size; a mirror
    (untrusted by design) answering a cut-short blob made that check refuse a good model
    ("manifest says N bytes, the registry has M"). Its answer is asked again of the registry
    itself, as its wrong bytes are, and the view's member reads back exactly."""
    from direct import read_direct_or_errno as read_direct
    from hostile import HostileMirror
    pad, q4, q8 = os.urandom(700 * 1024), os.urandom(MiB), os.urandom(2 * MiB)
    tar = _tar([("pad.bin", pad), ("q4.gguf", q4), ("q8.gguf", q8)])
    ref = _push_tar(registry.address, "beside/short-head", tar, indexed=True)
    with HostileMirror(registry.port, {"sha256:" + hashlib.sha256(tar).hexdigest(): tar[:MiB + 4096]}) as mirror:
        _mirrored(cli, registry.address, mirror.address)
        target = mounts.mount(ref, "--prefetch", "none", "--include", "q4.gguf", "--timeout", "5")
        assert tree_of(target) == {"q4.gguf"} and read_direct(target / "q4.gguf") == q4
        assert mirror.forged_served >= 1


@pytest.mark.parametrize("wrong", ["cut", "long"])
def test_a_mirror_answering_ranges_wrong_is_left_out_and_the_registry_read(registry, mounts, cli, wrong):
    """A mirror answering the size right but each range wrong: with fewer bytes than asked
    (its Content-Range says so), or with the right range and more bytes than that (its
    Content-Length says so). A view's reads by ranges leave that mirror out and read from
    the registry, instead of asking it again until the retries ran out (a mount of a view of
    a plain tar refused, "answered range ..., asked ...")."""
    import re
    import time

    import httpx
    from direct import read_direct_or_errno as read_direct
    from hostile import HostileMirror

    class WrongRanges(HostileMirror):
        def _serve_forged(self, request, method, data):
            if method == "HEAD":  # the size the registry has: only the ranges are wrong
                answer = httpx.head(self.upstream + request.path)
                request.send_response(answer.status_code)
                request.send_header("Content-Length", answer.headers["content-length"])
                request.end_headers()
                return
            if wrong == "cut":
                super()._serve_forged(request, method, data[:MiB + 4096])
                return
            self.forged_served += 1
            first, last = (int(n) for n in re.match(r"bytes=(\d+)-(\d+)", request.headers["Range"]).groups())
            body = data[first:last + 1] + bytes(100)
            request.send_response(206)
            request.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
            request.send_header("Content-Length", str(len(body)))
            request.end_headers()
            request.wfile.write(body)

    pad, q4, q8 = os.urandom(700 * 1024), os.urandom(MiB), os.urandom(2 * MiB)
    tar = _tar([("pad.bin", pad), ("q4.gguf", q4), ("q8.gguf", q8)])
    ref = _push_tar(registry.address, f"beside/wrong-ranges-{wrong}", tar, indexed=True)
    with WrongRanges(registry.port, {"sha256:" + hashlib.sha256(tar).hexdigest(): tar}) as mirror:
        _mirrored(cli, registry.address, mirror.address)
        started = time.monotonic()
        target = mounts.mount(ref, "--prefetch", "none", "--include", "q4.gguf", "--timeout", "5")
        assert read_direct(target / "q4.gguf") == q4 and mirror.forged_served >= 1
        assert time.monotonic() - started < 4


def test_a_mirror_cutting_a_compressed_layer_short_is_left_out_and_the_mount_lists_it(registry, mounts, cli):
    """A tar+gzip layer only streaming can list, through a mirror (right size, wrong bytes)
    that sends half of it: the stream that "ends early" counts as wrong bytes, as a digest
    that does not match does: the mirror is left out and the layer streamed again from the
    registry (the mount was refused, "compressed stream ends early")."""
    import gzip

    import httpx
    from conftest import push_artifact
    from direct import read_direct_or_errno as read_direct
    from hostile import HostileMirror

    class CutsBodies(HostileMirror):
        def _serve_forged(self, request, method, data):
            if method == "HEAD":
                answer = httpx.head(self.upstream + request.path)
                request.send_response(answer.status_code)
                request.send_header("Content-Length", answer.headers["content-length"])
                request.end_headers()
                return
            super()._serve_forged(request, method, data[:len(data) // 2])

    weights = os.urandom(MiB)
    packed = gzip.compress(_tar([("w/a.bin", weights), ("w/b.json", b"{}")]), compresslevel=1)
    ref = push_artifact(registry.address, "beside/cut-gzip", [(packed, "application/vnd.cncf.model.weight.v1.tar+gzip",
                                                                {})])
    with CutsBodies(registry.port, {"sha256:" + hashlib.sha256(packed).hexdigest(): packed}) as mirror:
        _mirrored(cli, registry.address, mirror.address)
        target = mounts.mount(ref, "--prefetch", "none", "--timeout", "5")
        assert read_direct(target / "w/a.bin") == weights and mirror.forged_served >= 1
