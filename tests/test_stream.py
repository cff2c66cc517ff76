"""Compressed tar layers walked as a stream: every byte out, every bad stream named.

Layers built this way are mounted from the real registry in test_mount and test_extract;
here the stream itself meets what other tools write (several gzip members, several zstd
frames) and what they should not (cut short, corrupt).
"""

import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from datetime import datetime

import pytest
from conftest import make_tar
from faults import FaultProxy, _read_head

from modelfs.errors import ManifestError
from modelfs.formats import zstd
from modelfs.formats.spec import Packing
from modelfs.formats.tarindex import iter_members
from modelfs.mount.stream import _WINDOW, StreamSource, _Decompressor

FILES = {"a.txt": b"hello", "b/c.bin": bytes(range(256)) * 9, "weights.bin": os.urandom(3 << 20)}
TAR = make_tar([(path, data, {}) for path, data in FILES.items()])
WHERE = "layer 2 (sha256:0123456789ab, weights.tar.gz)"


def in_pieces(blob: bytes, size: int):
    async def chunks():
        for start in range(0, len(blob), size):
            yield blob[start:start + size]
    return chunks()


async def walk(blob: bytes, packing: Packing, chunk: int = 65536) -> dict[str, bytes]:
    source = StreamSource(in_pieces(blob, chunk), packing, WHERE)
    seen = {}
    async for member in iter_members(source, WHERE):
        seen[member.path] = await source.read(member.size)
    await source.drain()
    assert source.compressed_bytes == len(blob)
    return seen


def split(data: bytes, parts: int) -> list[bytes]:
    step = len(data) // parts + 1
    return [data[i:i + step] for i in range(0, len(data), step)]


def gzip_members(data: bytes, parts: int) -> bytes:
    return b"".join(gzip.compress(piece) for piece in split(data, parts))


def zstd_frames(data: bytes, parts: int) -> bytes:
    return b"".join(zstd.compress(piece) for piece in split(data, parts))


@pytest.mark.parametrize("packing, blob", [
    (Packing.TAR_GZIP, gzip.compress(TAR)),
    (Packing.TAR_GZIP, gzip_members(TAR, 5)),  # as pigz --independent or `cat a.gz b.gz` write
    (Packing.TAR_ZSTD, zstd.compress(TAR)),
    (Packing.TAR_ZSTD, zstd_frames(TAR, 5)),  # as pzstd writes
], ids=["gzip", "gzip-members", "zstd", "zstd-frames"])
@pytest.mark.parametrize("chunk", [100, 65536, 1 << 30], ids=["small-chunks", "64k-chunks", "one-chunk"])
async def test_every_member_comes_out_whole(packing, blob, chunk):
    assert await walk(blob, packing, chunk) == FILES


async def test_output_held_back_by_the_window_limit_comes_out():
    """64 MiB of zeros is a few KiB of gzip: one chunk in, many bounded steps out."""
    big = {"zeros.bin": bytes(64 << 20)}
    blob = gzip.compress(make_tar([(path, data, {}) for path, data in big.items()]))
    assert await walk(blob, Packing.TAR_GZIP, chunk=1 << 30) == big


@pytest.mark.parametrize("packing, blob", [
    (Packing.TAR_GZIP, gzip.compress(TAR)[:-8]),  # trailer cut: the tar is whole, the gzip is not
    (Packing.TAR_GZIP, gzip.compress(TAR)[:len(gzip.compress(TAR)) // 2]),
    (Packing.TAR_ZSTD, zstd.compress(TAR)[:-3]),
], ids=["gzip-trailer", "gzip-half", "zstd-end"])
async def test_a_stream_cut_short_is_refused_with_the_layer_named(packing, blob):
    with pytest.raises(ManifestError) as info:
        await walk(blob, packing)
    assert str(info.value).startswith(WHERE + ":")
    assert "ends early" in str(info.value) or "stream ended inside the file" in str(info.value)


@pytest.mark.parametrize("packing, blob", [
    (Packing.TAR_GZIP, b"these bytes are not gzip at all"),
    (Packing.TAR_ZSTD, b"these bytes are not zstd at all"),
    (Packing.TAR_GZIP, gzip.compress(TAR) + b"trailing garbage"),
], ids=["not-gzip", "not-zstd", "gzip-garbage-after"])
async def test_a_corrupt_stream_is_refused_with_the_layer_named(packing, blob):
    with pytest.raises(ManifestError) as info:
        await walk(blob, packing)
    assert str(info.value).startswith(WHERE + ": corrupt compressed stream at byte ")


@pytest.mark.parametrize("packing, compress", [
    (Packing.TAR_GZIP, gzip.compress),
    (Packing.TAR_ZSTD, zstd.compress),  # 64 MiB of zeros is a few KiB of zstd
], ids=["gzip", "zstd"])
def test_no_step_of_a_compression_bomb_outputs_more_than_the_window(packing, compress):
    size = 64 << 20  # 16 windows; 256 MiB cost a second of gzip for no other check
    blob = compress(bytes(size))
    assert len(blob) < size // 1000
    decompressor = _Decompressor(packing)
    steps = [len(decompressor.feed(blob))]
    while (out := decompressor.step()) is not None:
        steps.append(len(out))
    assert sum(steps) == size and decompressor.finished
    assert max(steps) <= _WINDOW


class PausedFlipProxy(FaultProxy):
    """``flip`` (one byte in the middle of a blob's body) on a link that stalls for a moment
    near the end of the body: a lazy reader is served the flipped byte well before the layer
    ends and fails its check."""

    pause_at, pause = 0.8, 1.0

    def _forward(self, client: socket.socket, request: bytes, method: str, fault: str | None) -> bool:
        if fault != "pausedflip":
            return super()._forward(client, request, method, fault)
        with socket.create_connection(self.upstream) as upstream:
            upstream.sendall(request)
            reader = upstream.makefile("rb")
            head = _read_head(reader)
            if head is None:
                return False
            length = next(int(line.split(":", 1)[1]) for line in head.decode("latin-1").split("\r\n")[1:]
                          if line.lower().startswith("content-length:"))
            client.sendall(head.replace(b"Connection: close\r\n", b""))
            body = bytearray(reader.read(length))
            body[len(body) // 2] ^= 0x01
            split = int(len(body) * self.pause_at)
            client.sendall(body[:split])
            time.sleep(self.pause)
            client.sendall(body[split:])
            return True


# A process that maps a file of the mount and keeps its first ``size`` bytes locked in
# memory, as an inference server does with its weights, saying whether they are right.
MAPPING_READER = textwrap.dedent("""
    import ctypes, hashlib, mmap, os, sys, time
    path, size, expected, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    fd = os.open(path, os.O_RDONLY)
    address = libc.mmap(None, os.fstat(fd).st_size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    libc.mlock(ctypes.c_void_p(address), ctypes.c_size_t(size))
    deadline = time.time() + seconds
    while time.time() < deadline:
        started = time.time()
        right = hashlib.sha256(ctypes.string_at(address, size)).hexdigest() == expected
        print("right" if right else "wrong", started, flush=True)
        time.sleep(0.02)
""")


def _log_time(line: str) -> float:
    """The wall-clock time of a daemon log line."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@pytest.mark.parametrize("packing", ["tar+gzip", "tar+zstd"])
def test_a_lazy_compressed_layer_that_fails_its_check_leaves_no_wrong_page_mapped(packing, registry, cli, mounts,
                                                                                   tmp_path):
    """--verify lazy serves a compressed layer's files as they are unpacked; when the layer
    then fails its check (a byte flipped on the way), the bytes served go from the kernel's
    pages too, through the one drop path, so a process that mapped and locked the file sees
    the right bytes (or EIO) within moments, not the flipped byte for ever."""
    context = tmp_path / "ctx"
    context.mkdir()
    weights = os.urandom(3 << 20)
    (context / "w.bin").write_bytes(weights)
    (context / "Modelfile").write_text("MODEL w.bin\n")
    ref = f"{registry.address}/lazy-pages/{packing.replace('+', '-')}:v1"
    cli.run("build", "-t", ref, "--packing", packing, str(context))
    cli.run("push", "--plain-http", ref)
    layer = json.loads(cli.run("inspect", "--plain-http", "--json", ref).stdout)["manifest"]["layers"][0]["digest"]
    proxy = PausedFlipProxy(registry.port)
    try:
        proxy.only, proxy.faults = layer, ["pausedflip"]
        target = mounts.mount(ref.replace(registry.address, proxy.address), "--prefetch", "none", "--verify", "lazy",
                              "--timeout", "10", "--log-level", "info")
        head = 2 << 20  # the first two blocks: the flipped byte, 1.5 MiB in, is served before the pause
        reader = subprocess.Popen([sys.executable, "-c", MAPPING_READER, str(target / "w.bin"), str(head),
                                   hashlib.sha256(weights[:head]).hexdigest(), "8"], stdout=subprocess.PIPE, text=True)
        seen: list[tuple[str, float]] = []
        failed_at = None
        deadline = time.monotonic() + 20
        assert reader.stdout is not None
        for line in reader.stdout:
            word, at = line.split()
            seen.append((word, float(at)))
            if failed_at is None:
                log = "".join(p.read_text() for p in (cli.cache_dir / "logs").iterdir())
                failure = next((x for x in log.splitlines() if "retry 1 in" in x), None)
                failed_at = _log_time(failure) if failure else None
            if failed_at is not None and float(at) > failed_at + 2.2 or time.monotonic() > deadline:
                break
        reader.kill()
        reader.wait()
    finally:
        proxy.close()
    assert proxy.injected["pausedflip"] == 1
    assert failed_at is not None, "the layer did not fail its check"
    assert any(word == "wrong" and at < failed_at for word, at in seen)  # lazily served before the check
    late = [at - failed_at for word, at in seen if word == "wrong" and at > failed_at + 2.0]
    assert not late, f"the mapping still showed the flipped byte {max(late):.1f}s after the layer failed its check"
    assert seen[-1][0] == "right"
