"""Mount lifecycle: resolve, index, mount, serve, unmount.

``modelfs mount`` without ``--foreground`` starts this same code in a detached child and
waits for it to report on a pipe, so its exit status says whether the mount is live (and a
failure's message is printed where the user typed the command). Under systemd
(``--foreground``, ``Type=notify``) readiness goes to ``$NOTIFY_SOCKET`` instead.
SIGTERM/SIGINT terminate the FUSE loop and unmount cleanly, promptly whatever is in flight
(:mod:`.shutdown`).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, replace

import pyfuse3
import trio

from ..compose import Session, TrustedModel, model_view, open_session
from ..errors import MountError, ready_failure, user_error
from ..formats.view import View
from ..reference import parse
from ..resolve import Model, record
from ..resolved import ResolvedSettings
from ..storage.cache import PRUNE_TO, BlockCache, prune
from . import shutdown, status, table
from .binding import FileReaders
from .fetcher import BlobReader, Fetcher
from .filecheck import gate_for
from .fs import ModelFS, Permissions
from .metadata import Metadata, fetch_metadata, metadata_files, prefetch_files
from .metrics import render, serve_metrics
from .policy import available_cores
from .prefetch import fit_cache, prefetch_order, shard_order
from .tree import Tree, build_tree
from .viewblocks import ViewBlocks

log = logging.getLogger(__name__)


@dataclass
class MountOptions:
    """What one mount runs with. Every user-facing setting is in ``settings``, resolved from
    the one table (:mod:`modelfs.settings`) for the reference's registry: this class repeats
    none of their defaults."""

    reference: str
    mountpoint: str
    settings: ResolvedSettings
    ready_fd: int | None = None  # where to report READY or the failure (``modelfs mount`` and the CSI plugin)
    node_view: View | None = None  # the config's view, which the flags' only narrow (a CSI pod's volume)
    read_ahead_kb: int = 4096  # the kernel's read-ahead for the mount: 1 MiB reads instead of 128 KiB
    max_tasks: int = 64  # FUSE requests pyfuse3 serves at once


def sd_notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc)


def report_note(ready_fd: int | None, message: str) -> None:
    """A warning for the waiting parent to show before it learns how the mount went (``NOTE ...``)."""
    if ready_fd is not None:
        try:
            os.write(ready_fd, ("NOTE " + message.replace("\n", " ") + "\n").encode("utf-8", "backslashreplace"))
        except OSError:
            pass


def report(ready_fd: int | None, message: str) -> None:
    """Tell the waiting parent (``modelfs mount`` without --foreground) how it went."""
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, (message.replace("\n", " ") + "\n").encode("utf-8", "backslashreplace"))
        os.close(ready_fd)
    except OSError:
        pass


async def announce_ready(mountpoint: str, options: MountOptions, offline: str | None = None) -> None:
    """Report readiness only once the mount answers: a stat through it must come back.

    The stat goes through our own FUSE loop, so it runs in a thread while ``pyfuse3.main``
    serves it (on the trio thread before the loop runs it would deadlock).
    """
    st = await trio.to_thread.run_sync(os.stat, mountpoint)
    raise_read_ahead(st, options.read_ahead_kb)
    report(options.ready_fd, "READY" if offline is None else f"READY OFFLINE {offline}")
    sd_notify("READY=1")


def raise_read_ahead(st: os.stat_result, kb: int) -> None:
    """Let the kernel send 1 MiB reads instead of 128 KiB (about 2x throughput: doc/BENCHMARKS.md)."""
    path = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
    try:
        with open(path, "w") as handle:
            handle.write(str(kb))
        log.debug("%s set to %d", path, kb)
    except OSError as exc:
        log.info("cannot raise read_ahead_kb (%s): %s; the kernel will read 128 KiB at a time", path, exc.strerror)


def check_mountpoint(mountpoint: str, allow_nonempty: bool = False) -> None:
    """Refuse a mount point the mount would misuse. The mount table is asked first: a path
    already mounted is never stat-ed (its daemon may be frozen)."""
    if table.at(mountpoint) is not None:
        raise MountError(f"{mountpoint} is already a mount point (run `modelfs umount {mountpoint}` first)")
    if not os.path.lexists(mountpoint):
        raise MountError(f"mount point {mountpoint} does not exist (create it: mkdir -p {mountpoint})")
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} is not a directory")
    if not allow_nonempty and os.listdir(mountpoint):
        raise MountError(f"mount point {mountpoint} is not empty: the mount would hide its files (empty it, or pass "
                         "--allow-nonempty / -o nonempty)")


def prefetch_plan(files: list[tuple[str, BlobReader]], metadata: Metadata, cache_limit: int,
                  needs: ViewBlocks | None = None) -> list[BlobReader]:
    """The blobs worth prefetching, in the order loaders read them (:func:`~.prefetch.prefetch_order`:
    small files first, then the shards in their index's order), and under a cache size limit
    only as many as fit (:func:`~.prefetch.fit_cache`: of each, the bytes a view ``needs``)."""
    return fit_cache(prefetch_order(files, shard_order(metadata.indexes)), cache_limit,
                     needs.bytes if needs else lambda reader: reader.size)


async def _prefetch(fetcher: Fetcher, tree: Tree, readers: FileReaders, metadata: Metadata, cache_limit: int,
                    needs: ViewBlocks) -> None:
    """Metadata first (:mod:`.metadata`), then every blob in the order loaders read (of
    each, the blocks the view needs: :mod:`.viewblocks`)."""
    await fetch_metadata(metadata_files(tree, readers), metadata)
    files = prefetch_files(tree, readers)
    plan = prefetch_plan(files, metadata, cache_limit, needs)
    everything = {reader.digest: reader for _, reader in files}
    if len(plan) < len(everything):
        log.warning("prefetching %d of %d blobs (%d of %d bytes): the rest would not fit under the cache limit "
                    "of %d bytes; they are fetched when read", len(plan), len(everything),
                    sum(needs.bytes(r) for r in plan), sum(needs.bytes(r) for r in everything.values()), cache_limit)
    try:
        await fetcher.prefetch(plan, wanted=needs.of)
        log.info("prefetch complete: %d blobs cached", len(plan))
    except Exception as exc:  # its workers fail as an exception group; the mount must live on
        error = user_error(exc)
        if error is not None:
            log.warning("prefetch stopped: %s (reads still fetch on demand)", error)
        else:
            log.exception("prefetch stopped by an unexpected error (reads still fetch on demand)")


async def enforce_cache_limit(cache: BlockCache, fetcher: Fetcher, limit: int, interval: float = 2.0) -> None:
    """Keep the cache under ``limit`` bytes on disk: past it, evict least recently used blobs
    down to 90% of it, never one with a fetch in flight or a read waiting on it."""
    while True:
        pruned = prune(cache, int(limit * PRUNE_TO), over=limit, pinned=fetcher.pinned())
        for blob in pruned.evicted:
            fetcher.forget(blob.digest)
            log.info("evicted %s (%d bytes on disk) to stay under %d", blob.digest, blob.disk_bytes, limit)
        await trio.sleep(interval)


async def release_replaced_files(cache: BlockCache, interval: float = 1.0) -> None:
    """Let go of cache files another process removed, so a prune frees space while mounted."""
    while True:
        await trio.sleep(interval)
        released = await trio.to_thread.run_sync(cache.release_replaced)
        if released:
            log.info("let go of %d cache files removed by another process", released)


async def resolve_for_mount(session: Session) -> TrustedModel:
    """The model to serve and its block index. A GPU host rebooting while its registry is
    down still mounts a model it has cached: the manifest and config recorded at the last
    mount or pull are used (checked against their digests), cached blocks are served, and
    missing ones are fetched once the registry answers again; ``offline`` says why."""
    found = await session.resolve()
    if found.offline is None:
        return found
    offline = found.offline + "; blocks not in the cache fail until the registry answers"
    log.warning("%s", offline)
    return replace(found, offline=offline)


async def serve(options: MountOptions) -> None:
    reference = parse(options.reference)
    check_mountpoint(options.mountpoint, options.settings.allow_nonempty)  # named as the user gave it
    # the path as the mount table will show it: what `status`, `umount` and the files named
    # after a mount point (its status, its log) all key on, however the user reached it
    options = replace(options, mountpoint=table.resolve(options.mountpoint))
    settings = options.settings
    deadline = shutdown.ExitDeadline()  # armed when the mount ends: the rest of the teardown is bounded
    # a daemon waits for its registry (systemd or the CSI plugin started it for the long run)
    async with open_session(settings, reference, fail_fast=False) as session:
        found = await resolve_for_mount(session)
        model, index = found.model, found.index
        if model.verdict is not None and not model.verdict.met:
            report_note(options.ready_fd, f"signatures = warn: {model.verdict.summary()}")
        async with trio.open_nursery() as nursery:
            fetcher = session.fetcher(nursery, index)
            log.info("data path: %d worker threads receive, check and store blocks (%d cores available)",
                     fetcher.ranges.workers, available_cores())
            if fetcher.policy.lazy:
                log.warning("--verify lazy: bytes of blobs without a trusted block index are served before "
                            "they are checked; a corrupt range can reach readers until its blob completes")
            readers = FileReaders(fetcher)
            tree = await build_tree(model, readers, model_view(settings, options.node_view))
            readers.gate = gate_for(model.verdict, tree)  # before anything is served
            needs = ViewBlocks(tree, session.cache.block_size)  # of each blob: what is fetched, prefetched, counted
            fetcher.confine(needs.confine)
            record(session.cache, model, index.data if index else b"")
            permissions = Permissions(os.getuid() if settings.uid is None else settings.uid,
                                      os.getgid() if settings.gid is None else settings.gid,
                                      settings.file_mode, settings.dir_mode, settings.allow_other)
            ops = ModelFS(tree, readers, str(model.reference), permissions, needs)
            try:
                await _serve_mount(nursery, ops, readers, session.cache, tree, needs, options, model, found.offline,
                                   deadline)
            except BaseException:
                deadline.arm(shutdown.EXIT_SECONDS, 1)
                raise
            # the mount is gone: its tasks get a bounded time to end (a thread nothing interrupts is left behind)
            deadline.arm(shutdown.EXIT_SECONDS, 0)
        c = fetcher.stats
        log.info("unmounted %s: %d reads (%d failed), %d bytes fetched in %d requests, %d retries; "
                 "%d block buffers, used %d more times", options.mountpoint, c.reads, c.read_errors, c.bytes_fetched,
                 c.requests, c.retries, fetcher.buffers.created, fetcher.buffers.reused)
    deadline.disarm()


async def _serve_mount(nursery: trio.Nursery, ops: ModelFS, readers: FileReaders, cache: BlockCache, tree: Tree,
                       needs: ViewBlocks, options: MountOptions, model: Model, offline: str | None,
                       deadline: shutdown.ExitDeadline) -> None:
    mountpoint = options.mountpoint  # resolved by serve()
    fetcher = readers.fetcher
    what = f"{options.reference} ({model.reference.digest})"
    fuse_options = {"fsname=" + str(parse(options.reference)), "subtype=modelfs", "ro", "default_permissions", "noatime"}
    if options.settings.allow_other:
        fuse_options.add("allow_other")
    try:
        pyfuse3.init(ops, mountpoint, fuse_options)
    except RuntimeError as exc:
        raise MountError(f"cannot mount {mountpoint}: {exc} (is /dev/fuse available and fusermount3 installed?)") from None
    device = shutdown.mount_device(mountpoint)
    fuse_loop = trio.CancelScope()  # pyfuse3.main's: a stop signal cancels its requests in flight after a grace
    try:
        log.info("mounted %s at %s: %d files", what, mountpoint, len(tree.files()))
        nursery.start_soon(shutdown.watch_signals, fuse_loop, sd_notify, deadline)
        nursery.start_soon(release_replaced_files, cache)
        metadata = Metadata()
        if options.settings.prefetch == "all":  # READY is not held for it: a header read joins its fetch
            nursery.start_soon(_prefetch, fetcher, tree, readers, metadata, options.settings.cache_max_size, needs)
            if readers.gate is not None:
                nursery.start_soon(readers.gate.prefetch, tree, readers.reader)
        if options.settings.cache_max_size:
            nursery.start_soon(enforce_cache_limit, cache, fetcher, options.settings.cache_max_size)
        if options.settings.metrics:
            labels = {"mountpoint": mountpoint, "reference": options.reference, "digest": model.reference.digest or ""}
            await nursery.start(serve_metrics, options.settings.metrics, lambda: render(fetcher.stats, labels))
        started = time.time()

        def collect() -> status.MountStatus:
            every = readers.every(tree)
            c = fetcher.stats
            return status.MountStatus(
                pid=os.getpid(), mountpoint=mountpoint, reference=options.reference, digest=model.reference.digest or "",
                offline=offline, bytes_total=sum(needs.bytes(r) for r in every),
                bytes_local=sum(needs.local_bytes(r) for r in every),
                reads=c.reads, read_errors=c.read_errors,
                integrity_errors=c.integrity_errors, damaged_blocks=c.damaged_blocks, handler_errors=c.handler_errors,
                bytes_fetched=c.bytes_fetched, workers=c.workers, started=started, updated=time.time(),
                metadata=metadata.line() if options.settings.prefetch == "all" else None,
                metadata_seconds=metadata.seconds, **status.signature_fields(model.verdict, readers.gate))

        nursery.start_soon(status.keep_writing, collect, sd_notify)
        nursery.start_soon(announce_ready, mountpoint, options, offline)
        with fuse_loop:
            await pyfuse3.main(max_tasks=options.max_tasks)
    finally:
        nursery.cancel_scope.cancel()
        shutdown.unmount_own(mountpoint, device)


# Worker threads release the GIL for every receive, hash and write, and must get it back to
# go on. With CPython's default 5 ms switch interval a worker may wait that long for a busy
# loop thread each time (measured here: two workers took 3 s for a GiB beside a busy Python
# thread at 5 ms, 0.8 s at 0.5 ms). In the daemon, 0.2-5 ms measured the same within noise
# (a worker takes the GIL a few times per block); 1 ms bounds the worst case.
GIL_SWITCH_SECONDS = 0.001


def _reply_to_a_reader_gone(record: logging.LogRecord) -> bool:
    """pyfuse3 logs an ERROR when the kernel no longer knows a request we answer: the reader
    went away meanwhile (a loader killed, its read interrupted, the mount detached with
    read-ahead still on its way). Nothing was lost and nothing can be done: a debug line,
    not an error in an operator's log (it showed as 2 "errors" of a benchmark run)."""
    if record.levelno >= logging.ERROR and "fuse_reply_" in str(record.msg) and record.args \
            and "No such file or directory" in str(record.args):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
    return True


def run_foreground(options: MountOptions) -> None:
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    logging.getLogger("pyfuse3").addFilter(_reply_to_a_reader_gone)
    try:
        trio.run(serve, options)
    except BaseException as exc:
        error = user_error(exc)
        report(options.ready_fd, ready_failure(exc))
        if error is not None:
            raise error from None
        raise
