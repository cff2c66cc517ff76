"""Claims on blocks across processes: one open of the claims file excludes another, a claim
goes with the process (or the open) that held it, and a released one is seen at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import trio

from modelfs.storage.claims import PeerClaims


def test_a_claim_excludes_other_processes_until_released(tmp_path):
    path = str(tmp_path / "blob.claims")
    with PeerClaims(path) as ours, PeerClaims(path) as peer:
        assert ours.take(0, 9) == 9
        assert peer.take(0, 9) == -1 and peer.held_by_peer(0)
        assert peer.take(10, 12) == 12  # blocks nobody holds
        ours.release(0, 4)
        assert not peer.held_by_peer(3) and peer.held_by_peer(5)
        assert peer.take(0, 9) == 4  # up to the first block still held
    with PeerClaims(path) as later:
        assert later.take(0, 20) == 20  # closing released everything


async def test_a_claim_dies_with_its_process(tmp_path):
    path = tmp_path / "blob.claims"
    holder = await trio.lowlevel.open_process([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from modelfs.storage.claims import PeerClaims
        claims = PeerClaims({str(path)!r})
        assert claims.take(0, 3) == 3
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE)
    try:
        with trio.fail_after(30):
            said = b""
            while b"\n" not in said:
                said += await holder.stdout.receive_some(64)
        assert said.strip() == b"held"
        with PeerClaims(str(path)) as ours:
            assert ours.take(2, 5) == 1 and ours.held_by_peer(2)
            holder.kill()
            await holder.wait()
            assert await ours.wait_for_peer(2, trio.current_time() + 10)
            assert ours.take(0, 5) == 5
    finally:
        holder.kill()
        await holder.wait()
