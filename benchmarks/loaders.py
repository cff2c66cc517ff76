"""Three inference-server loaders' read patterns, each run as its own process on plain paths:

- ``vllm``: vLLM's default: config and tokenizer, then each shard in sorted order through the
  real ``safetensors`` library (``safe_open(framework="numpy")``, which mmaps the file) and
  ``get_tensor`` for every name in ``keys()`` order (sorted names, not file order);
- ``runai``: Run:ai Model Streamer's: every shard's header first, then 16 threads each reading
  an even share of all tensor bytes with ``os.pread`` in 8 MiB chunks;
- ``odirect``: fastsafetensors': headers, then each file with O_DIRECT in 16 MiB chunks into a
  page-aligned mmap buffer;
- ``gguf``: llama.cpp's without mmap, on a one-file GGUF: the header parsed field by field
  through a buffered file (its vocabulary is in it), then every tensor in file order.

The safetensors loaders read config.json and tokenizer.json first (the server does, whatever
loads the weights). Every piece read is hashed (xxh3, 0.02 s/GiB) and compared with the source's hash
of the same piece (:func:`expected`, computed from the local files): a wrong byte exits 1.

    python -m benchmarks.loaders PATTERN EXPECTED.json

imports, prints ``ready``, reads the model directory from stdin, loads it, and prints JSON:
monotonic ``start``, ``first`` (the first tensor in hand; for runai and odirect, the first
chunk of tensor bytes), ``end``, and ``bytes`` read.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import xxhash

MiB = 1 << 20
PATTERNS = ("vllm", "runai", "odirect", "gguf")
PRELUDE = ("config.json", "tokenizer.json")
THREADS, RUNAI_CHUNK, ODIRECT_CHUNK = 16, 8 * MiB, 16 * MiB
Piece = tuple[str, int, int]  # file name, offset, length


def shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def header(path: Path) -> tuple[int, dict]:
    """Where a shard's tensor bytes start, and its header."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return 8 + length, json.loads(handle.read(length))


def tensor_pieces(directory: Path) -> list[tuple[str, Piece]]:
    """vLLM's order: shards sorted, names in ``keys()`` order (sorted); each tensor's bytes."""
    out = []
    for path in shards(directory):
        start, head = header(path)
        for name in sorted(k for k in head if k != "__metadata__"):
            begin, end = head[name]["data_offsets"]
            out.append((f"{path.name}:{name}", (path.name, start + begin, end - begin)))
    return out


def runai_shares(directory: Path) -> list[list[Piece]]:
    """All tensor bytes of all shards in a row, cut in 16 even shares, each in 8 MiB chunks
    (a chunk never crosses a file's end)."""
    regions = []
    for path in shards(directory):
        start, _ = header(path)
        regions.append((path.name, start, path.stat().st_size - start))
    total = sum(length for _, _, length in regions)
    share = -(-total // THREADS)
    out: list[list[Piece]] = []
    for k in range(THREADS):
        lo, hi, base, pieces = k * share, min(total, (k + 1) * share), 0, []
        for name, start, length in regions:
            a, b = max(lo, base), min(hi, base + length)
            while a < b:
                step = min(RUNAI_CHUNK, b - a)
                pieces.append((name, start + a - base, step))
                a += step
            base += length
        out.append(pieces)
    return out


def odirect_pieces(directory: Path) -> list[Piece]:
    return [(path.name, offset, min(ODIRECT_CHUNK, path.stat().st_size - offset))
            for path in shards(directory) for offset in range(0, path.stat().st_size, ODIRECT_CHUNK)]


GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
GGML_BYTES = {0: 4, 1: 2}  # F32, F16


def gguf_tensors(path: Path) -> tuple[int, list[tuple[str, Piece]]]:
    """Where a GGUF's tensor data starts, and each tensor's bytes in file order."""
    with open(path, "rb") as handle:
        def number(fmt: str) -> int:
            return struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return handle.read(number("<Q")).decode()

        def skip(kind: int) -> None:
            if kind == 8:
                string()
            elif kind == 9:
                inner, count = number("<I"), number("<Q")
                for _ in range(count):
                    skip(inner)
            else:
                handle.read(GGUF_SIZES[kind])
        if handle.read(4) != b"GGUF":
            raise WrongBytes(f"{path.name}: not a GGUF file")
        _, count, pairs = number("<I"), number("<Q"), number("<Q")
        for _ in range(pairs):
            string()
            skip(number("<I"))
        infos = []
        for _ in range(count):
            name, dims = string(), number("<I")
            elements = 1
            for _ in range(dims):
                elements *= number("<Q")
            kind, offset = number("<I"), number("<Q")
            infos.append((name, offset, elements * GGML_BYTES[kind]))
        start = handle.tell() + -handle.tell() % 32
    return start, [(f"{path.name}:{name}", (path.name, start + offset, length)) for name, offset, length in infos]


def gguf_pieces(directory: Path) -> list[tuple[str, Piece]]:
    path = next(directory.glob("*.gguf"))
    start, tensors = gguf_tensors(path)
    return [(f"{path.name}:header", (path.name, 0, start)), *tensors]


def key(piece: Piece) -> str:
    return f"{piece[0]}:{piece[1]}:{piece[2]}"


def expected(pattern: str, directory: Path) -> dict[str, str]:
    """The source's hash of every piece ``pattern`` reads of the model in ``directory``."""
    pieces: list[tuple[str, Piece]]
    if pattern == "vllm":
        pieces = tensor_pieces(directory)
    elif pattern == "gguf":
        pieces = gguf_pieces(directory)
    elif pattern == "runai":
        pieces = [(key(p), p) for share in runai_shares(directory) for p in share]
    else:
        pieces = [(key(p), p) for p in odirect_pieces(directory)]
    out = {name: xxhash.xxh3_64_hexdigest((directory / name).read_bytes()) for name in prelude_files(directory)}
    handles: dict[str, int] = {}
    try:
        for name, (file, offset, length) in pieces:
            if file not in handles:
                handles[file] = os.open(directory / file, os.O_RDONLY)
            out[name] = xxhash.xxh3_64_hexdigest(os.pread(handles[file], length, offset))
    finally:
        for fd in handles.values():
            os.close(fd)
    return out


class WrongBytes(Exception):
    """A piece read differs from the source's, or the load missed some: the benchmark fails."""


class Check:
    """Compares each piece's hash with the source's; remembers what was seen."""

    def __init__(self, hashes: dict[str, str]) -> None:
        self.hashes, self.seen, self.bytes, self.first = hashes, 0, 0, 0.0
        self.lock = threading.Lock()

    def __call__(self, name: str, data: object, length: int) -> None:
        got = xxhash.xxh3_64_hexdigest(data)  # type: ignore[arg-type]
        if self.hashes.get(name) != got:
            raise WrongBytes(f"{name}: read bytes differ from the source's (xxh3 {got}, expected {self.hashes.get(name)})")
        with self.lock:
            self.seen += 1
            self.bytes += length
            if not self.first and name not in PRELUDE and not name.endswith(":header"):  # weights in hand
                self.first = time.monotonic()

    def complete(self) -> None:
        if self.seen != len(self.hashes):
            raise WrongBytes(f"read {self.seen} pieces of {len(self.hashes)}")


def prelude_files(directory: Path) -> list[str]:
    return [name for name in PRELUDE if (directory / name).exists()]


def prelude(directory: Path, check: Check) -> None:
    for name in prelude_files(directory):
        data = (directory / name).read_bytes()
        json.loads(data)
        check(name, data, len(data))


def load_vllm(directory: Path, check: Check) -> None:
    from safetensors import safe_open
    for path in shards(directory):
        with safe_open(str(path), framework="numpy") as model:
            for name in model.keys():  # noqa: SIM118 -- safe_open is not a dict
                tensor = model.get_tensor(name)
                check(f"{path.name}:{name}", tensor, tensor.nbytes)


def load_runai(directory: Path, check: Check) -> None:
    shares = runai_shares(directory)  # reads every header first
    handles = {path.name: os.open(path, os.O_RDONLY) for path in shards(directory)}

    def read(pieces: list[Piece]) -> None:
        for piece in pieces:
            data = os.pread(handles[piece[0]], piece[2], piece[1])
            if len(data) != piece[2]:
                raise WrongBytes(f"{key(piece)}: short read of {len(data)} bytes")
            check(key(piece), data, piece[2])
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            for done in [pool.submit(read, share) for share in shares]:
                done.result()
    finally:
        for fd in handles.values():
            os.close(fd)


def load_odirect(directory: Path, check: Check) -> None:
    paths = shards(directory)
    for path in paths:
        header(path)
    view = memoryview(mmap.mmap(-1, ODIRECT_CHUNK))  # page-aligned, as O_DIRECT wants
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            for piece in chunks(fd, view, path.name):
                check(key(piece), view[:piece[2]], piece[2])
        finally:
            os.close(fd)


def chunks(fd: int, view: memoryview, name: str) -> Iterator[Piece]:
    """Fill the buffer at each 16 MiB offset (a short read continues at the next page)."""
    offset = 0
    while True:
        filled = 0
        while filled < len(view):
            got = os.preadv(fd, [view[filled:]], offset + filled)
            if got <= 0:
                break
            filled += got
        if filled:
            yield name, offset, filled
        if filled < len(view):
            return
        offset += filled


def load_gguf(directory: Path, check: Check) -> None:
    pieces = gguf_pieces(directory)  # the header, parsed through a buffered file
    fd = os.open(directory / pieces[0][1][0], os.O_RDONLY)
    try:
        for name, (_, offset, length) in pieces:
            data = os.pread(fd, length, offset)
            check(name, data, len(data))
    finally:
        os.close(fd)


LOADERS: dict[str, Callable[[Path, Check], None]] = {"vllm": load_vllm, "runai": load_runai, "odirect": load_odirect, "gguf": load_gguf}


def main() -> int:
    pattern, hashes = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    print("ready", flush=True)
    directory = Path(sys.stdin.readline().strip())
    start = time.monotonic()
    check = Check(hashes)
    try:
        prelude(directory, check)
        LOADERS[pattern](directory, check)
        check.complete()
    except WrongBytes as error:
        print(f"{pattern} loader: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"start": start, "first": check.first, "end": time.monotonic(), "bytes": check.bytes}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
