"""Range fetches on worker threads (``modelfs.mount.rangefetch``) against a real registry: a
worker that fails is replaced, cancelling stops every worker, and reads through presigned
redirects keep working past the URLs' expiry without ever sending credentials to storage."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import trio
from storage import PresigningFront

from modelfs.errors import FetchError
from modelfs.mount.fetcher import Fetcher, FetchPolicy
from modelfs.registry import RegistryClient, RetryPolicy, ranges
from modelfs.storage.cache import BlockCache

MiB = 1 << 20


@pytest.fixture(scope="module")
def pushed(registry, session_cli, tmp_path_factory):
    """A 20 MiB weights blob in the real registry: (reference, digest, bytes)."""
    context = tmp_path_factory.mktemp("rangefetch")
    data = os.urandom(20 * MiB + 4321)
    (context / "w.bin").write_bytes(data)
    (context / "Modelfile").write_text("MODEL w.bin\n")
    ref = f"{registry.address}/rangefetch/model:v1"
    session_cli.run("build", "--no-block-index", "-t", ref, str(context))
    session_cli.run("push", "--plain-http", ref)
    return ref, "sha256:" + hashlib.sha256(data).hexdigest(), data


def read_blob(registry_address: str, digest: str, size: int, cache_dir, policy: FetchPolicy,
              verify: str = "lazy") -> tuple[bytes, Fetcher]:
    """Every byte of the blob through an in-process fetcher, read as a sequential reader would."""
    result: list = []

    async def main() -> None:
        async with RegistryClient(registry_address, plain_http=True) as client:
            async with trio.open_nursery() as nursery:
                fetcher = Fetcher(BlockCache(str(cache_dir)), client, "rangefetch/model", nursery,
                                  FetchPolicy(**{**policy.__dict__, "verify": verify}))
                reader = fetcher.reader(digest, size)
                parts = [await reader.read(offset, MiB) for offset in range(0, size, MiB)]
                result.extend([b"".join(parts), fetcher])

    trio.run(main)
    return result[0], result[1]


def test_a_worker_that_dies_mid_range_is_replaced_and_the_read_completes(pushed, registry, tmp_path, monkeypatch):
    _, digest, data = pushed
    real = ranges.read_range
    deaths = []

    def dies_once(pool, location, start, lengths, sink, transfer, what, new_buffer):
        if not deaths and len(lengths) >= 3:  # the first range of several blocks
            deaths.append(start)

            def sink_then_die(position, block):
                sink(position, block)
                if position == 1:
                    raise RuntimeError("worker died")  # a bug, a MemoryError: anything but a network error
            return real(pool, location, start, lengths, sink_then_die, transfer, what, new_buffer)
        return real(pool, location, start, lengths, sink, transfer, what, new_buffer)

    monkeypatch.setattr(ranges, "read_range", dies_once)
    got, fetcher = read_blob(registry.address, digest, len(data), tmp_path / "cache", FetchPolicy(timeout=10))
    assert got == data
    assert fetcher.stats.retries == 1
    # the replacement resumed after the two blocks the dead worker delivered
    assert fetcher.stats.bytes_fetched == len(data)


def test_a_worker_that_keeps_dying_fails_its_reads_within_the_policy(pushed, registry, tmp_path, monkeypatch):
    _, digest, data = pushed

    def always_dies(*args, **kwargs):
        raise RuntimeError("worker died")

    monkeypatch.setattr(ranges, "read_range", always_dies)
    started = time.monotonic()
    with pytest.raises(BaseExceptionGroup) as raised:  # from the nursery the read ran in
        read_blob(registry.address, digest, len(data), tmp_path / "cache", FetchPolicy(timeout=10, retry=RetryPolicy(attempts=3)))
    failed = raised.value.subgroup(FetchError)
    assert failed is not None and "worker died" in str(failed.exceptions[0])
    assert time.monotonic() - started < 10


def test_cancelling_the_fetch_stops_every_worker_at_once(pushed, faulty, tmp_path):
    """Unmount cancels the mount's nursery: workers blocked on a stalled server return at once,
    and none is left running."""
    _, digest, data = pushed
    faulty.stall_seconds = 60
    faulty.persistent = "stall"
    before = threading.active_count()
    elapsed: list[float] = []

    async def main() -> None:
        async with RegistryClient(faulty.address, plain_http=True) as client:
            with trio.move_on_after(1.5):
                async with trio.open_nursery() as nursery:
                    fetcher = Fetcher(BlockCache(str(tmp_path / "cache")), client, "rangefetch/model", nursery,
                                      FetchPolicy(timeout=120, verify="lazy"))
                    reader = fetcher.reader(digest, len(data))
                    nursery.start_soon(reader.read, 0, 8 * MiB)
                    await trio.sleep(1.0)  # workers are now waiting on the stalled server
                    started = trio.current_time()
            elapsed.append(trio.current_time() - started)

    trio.run(main)
    assert elapsed[0] < 2.0
    deadline = time.monotonic() + 5
    while threading.active_count() > before + 16 and time.monotonic() < deadline:  # idle pooled threads may stay
        time.sleep(0.1)
    busy = [t.name for t in threading.enumerate() if t.name.startswith("read_range")]
    assert busy == []


def test_presigned_redirects_are_followed_and_renewed_when_they_expire(basic_registry, cli, mounts, tmp_path):
    """Blob bytes come from storage on another origin through URLs valid for one second; the
    reader pauses past that between reads far apart, so later ranges meet expired URLs (403)
    and the mount asks the registry again. The registry's credentials never reach storage."""
    data = os.urandom(30 * MiB + 99)
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "w.bin").write_bytes(data)
    (context / "Modelfile").write_text("MODEL w.bin\n")
    cli.run("login", "--plain-http", basic_registry.address, "-u", "alice", "--password-stdin", input="s3cret-pass\n")
    ref = f"{basic_registry.address}/presigned/model:v1"
    cli.run("build", "-t", ref, str(context))
    cli.run("push", "--plain-http", ref)
    with PresigningFront(basic_registry.port, ttl=1.0, storage_auth=("alice", "s3cret-pass")) as front:
        cli.run("login", "--plain-http", front.address, "-u", "alice", "--password-stdin", input="s3cret-pass\n")
        target = mounts.mount(ref.replace(basic_registry.address, front.address), "--prefetch", "none")
        with open(target / "w.bin", "rb", buffering=0) as handle:
            for offset in (24 * MiB, 0, 12 * MiB):  # far apart: no read-ahead reaches the next one
                if offset != 24 * MiB:
                    time.sleep(1.3)  # every presigned URL handed out so far has expired
                handle.seek(offset)
                assert handle.read(4096) == data[offset:offset + 4096]
            handle.seek(0)
            assert handle.read() == data
        assert front.authorization_leaks == 0
        assert front.expired_refusals >= 1
        assert len(front.served_urls) >= 2  # renewed, and kept working
    log = "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
    assert "asking the registry where to read it again" in log
    assert [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line] == []  # expiry is routine


def test_a_peer_is_waited_on_for_a_quarter_of_the_timeout_at_most_five_seconds():
    from modelfs.storage.claims import PEER_WAIT_SECONDS, peer_wait
    assert peer_wait(2) == 0.5
    assert peer_wait(120) == PEER_WAIT_SECONDS == 5.0
    assert peer_wait(0) == 0.0


def test_a_frozen_peer_holding_claims_is_waited_on_for_less_than_a_short_timeout(pushed, cli, mounts):
    """Another process claimed the blocks (an OFD lock on the blob's .claims file) and froze.
    With --timeout 2, under the 5 s a peer is waited on at most, the read still succeeds: the
    peer is waited on for a share of the timeout, then the blocks are fetched anyway."""
    from direct import read_direct
    ref, digest, data = pushed
    claims = cli.cache_dir / "blobs" / "sha256" / f"{digest.split(':')[1]}.claims"
    claims.parent.mkdir(parents=True)
    peer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, signal
        from modelfs.storage.claims import PeerClaims
        claims = PeerClaims({str(claims)!r})
        assert claims.take(0, 31) == 31
        print("held", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen, its claims held
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout is not None and peer.stdout.readline().strip() == "held"
        target = mounts.mount(ref, "--prefetch", "none", "--verify", "lazy", "--timeout", "2")
        started = time.monotonic()
        assert read_direct(target / "w.bin", 0, 65536) == data[:65536]
        assert time.monotonic() - started < 2
    finally:
        peer.kill()
        peer.wait()
    log = "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
    assert "another process has held block 0" in log and "for over 0.5s" in log, log
