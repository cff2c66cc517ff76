"""The ``modelfs`` command line.

Every failure a user can cause prints one line, ``modelfs: error: ...``, and exits non-zero;
tracebacks are for bugs only (and ``--log-level debug``).
"""

from __future__ import annotations

import argparse
import getpass
import inspect
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import trio

from . import __version__, settings, signing
from .artifact.build import build
from .artifact.extract import extract
from .artifact.layout import Store, default_store_dir
from .artifact.push import push, push_size
from .config import Config, ConfigError, parse_size
from .config import load as load_config
from .credentials import Credential, CredentialStore
from .dirs import check_directory
from .errors import (
    AuthenticationError,
    CacheError,
    InvalidReferenceError,
    ManifestError,
    ModelfsError,
    MountError,
    NotAModelError,
    NotFoundError,
    SignatureError,
    TLSError,
    UnavailableError,
    UnsafePathError,
    parse_ready_failure,
    user_error,
)
from .logfile import LOG_MAX_BYTES, DaemonLog, daemon_log_path
from .mount import blockindex
from .mount import status as mount_status
from .mount.cache import BlockCache, default_cache_dir
from .mount.daemon import MountOptions, run_foreground
from .mount.fetcher import Fetcher
from .mount.metrics import render_host, serve_metrics
from .mount.table import active_mounts, umount
from .reference import Reference, parse
from .registry.mirrors import open_client
from .resolve import check_layer_sizes, describe, fetch_model, fetch_or_cached, held_whole, record, trusted_index
from .spec import OCI_MANIFEST, Packing

log = logging.getLogger("modelfs")


def _setup_logging(level: str, log_file: str | None = None, log_max_size: int = LOG_MAX_BYTES) -> None:
    handler = DaemonLog(log_file, log_max_size) if log_file else logging.StreamHandler(sys.stderr)
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def _resolve_settings(args: argparse.Namespace, config: Config | None = None) -> None:
    """Flags override the config files, which override the built-in defaults (one table:
    :mod:`modelfs.settings`). The cache directory may also come from MODELFS_CACHE_DIR."""
    config = config or load_config()
    args.config = config
    args.cache_dir = (args.cache_dir or os.environ.get("MODELFS_CACHE_DIR") or settings.resolve("cache_dir", None, config)
                      or default_cache_dir())


def _setting(args: argparse.Namespace, name: str, host: str | None = None) -> Any:
    return settings.resolve(name, getattr(args, name, None), args.config, host)


def _client(args: argparse.Namespace, reference: Reference | str, write: bool = False):
    """A registry client honouring flags and config; reads go through configured mirrors."""
    registry = reference.registry if isinstance(reference, Reference) else reference
    return open_client(registry, plain_http=_setting(args, "plain_http", registry),
                       ca_file=_setting(args, "ca_file", registry),
                       mirrors=None if write else args.config.registry(registry).mirrors,
                       fail_fast=args.handler is not cmd_mount)  # a mount daemon waits for its registry


def _trust(args: argparse.Namespace, reference: Reference, verifying: bool = False) -> signing.Policy:
    """The signature policy for ``reference``: flags, then the config's [trust."..."] scope, then its top level."""
    given = {name: getattr(args, name, None) for name in signing.policy.NAMES}
    return signing.build(given, args.config, reference, verifying)


class _Progress:
    """A one-line progress bar on stderr (only when it is a terminal, else a final line)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done, self.already = total, label, 0, 0
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()

    def __call__(self, amount: int) -> None:
        """``amount`` more bytes moved over the network."""
        self.done += amount
        self._draw()

    def skip(self, amount: int) -> None:
        """``amount`` bytes that were already there (cached, or present at the registry)."""
        self.already += amount
        self.done += amount
        self._draw()

    def _draw(self) -> None:
        if self.tty:
            fraction = min(1.0, self.done / self.total if self.total else 1.0)
            bar = "#" * int(fraction * 30)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {fraction:6.1%} {self.done / 1e6:,.0f}/{self.total / 1e6:,.0f} MB")
            sys.stderr.flush()

    def finish(self) -> None:
        """A last line with the rate of what moved: bytes that were already there took no time."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        end = "\n" if self.tty else ""
        moved = max(0, self.done - self.already)
        if not moved:
            line = f"{self.label}: all {self.total / 1e6:,.1f} MB already there"
        else:
            line = f"{self.label}: {moved / 1e6:,.1f} MB in {elapsed:.1f}s ({moved / 1e6 / elapsed:,.0f} MB/s)"
            if self.already:
                line += f", {self.already / 1e6:,.1f} MB already there"
        sys.stderr.write(f"{end}{line}\n")


# -- commands ----------------------------------------------------------------------------


async def cmd_login(args: argparse.Namespace) -> int:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    elif args.password is not None:
        password = args.password
    elif not sys.stdin.isatty():
        raise ModelfsError("no terminal to ask for the password on: pipe it in with --password-stdin "
                           f"(printf %s \"$TOKEN\" | modelfs login {args.registry} -u {args.username or 'USER'} "
                           "--password-stdin)")
    else:
        password = getpass.getpass(f"Password for {args.username}@{args.registry}: ")
    if not args.username or not password:
        raise ModelfsError("login needs a username (-u) and a password")
    credential = Credential(args.username, password)
    async with _client(args, args.registry, write=True) as client:
        client.use_credential(credential)
        await client.check_login()
    CredentialStore().save(args.registry, credential)
    print(f"Login succeeded for {args.registry}")
    return 0


async def cmd_logout(args: argparse.Namespace) -> int:
    if not CredentialStore().remove(args.registry):
        raise ModelfsError(f"not logged in to {args.registry}")
    print(f"Removed credentials for {args.registry}")
    return 0


async def cmd_build(args: argparse.Namespace) -> int:
    reference = parse(args.tag)
    modelfile = args.file or os.path.join(args.context, "Modelfile")
    store = Store(args.store)
    with store.locked(exclusive=False):  # `modelfs rm` elsewhere must not collect blobs not yet named
        result = build(args.context, modelfile, str(reference), store, Packing(args.packing),
                       block_index=not args.no_block_index)
    for path in result.unmatched:
        print(f"warning: {path} is matched by no Modelfile command and is not included", file=sys.stderr)
    total = sum(layer.size for layer in result.layers)
    print(f"Built {reference} ({len(result.layers)} layers, {total / 1e6:,.1f} MB): {result.manifest_digest}")
    return 0


async def cmd_push(args: argparse.Namespace) -> int:
    reference = parse(args.reference)
    store = Store(args.store)
    progress = _Progress(push_size(store, reference, args.source), f"push {reference}")
    async with _client(args, reference, write=True) as client:
        result = await push(client, store, reference, args.source, chunk_size=args.chunk_size << 20,
                            block_index=not args.no_block_index, progress=progress, skipped=progress.skip)
    progress.finish()
    chunked = f", {result.chunked} in chunks" if result.chunked else ""
    print(f"Pushed {reference}: {len(result.uploaded)} blobs uploaded ({result.uploaded_bytes / 1e6:,.1f} MB{chunked}), "
          f"{len(result.skipped)} already present, {len(result.mounted)} mounted; digest {result.digest}")
    return 0


def _existing_cache(args: argparse.Namespace) -> BlockCache | None:
    """The block cache, if there is one (commands that only read never create it, so a
    read-only directory with no cache in it is no cache, not an error)."""
    return BlockCache(args.cache_dir) if os.path.isdir(os.path.join(args.cache_dir, "blobs", "sha256")) else None


def _warn_offline(offline: str | None) -> None:
    if offline is not None:
        print(f"warning: offline: {offline}", file=sys.stderr)


def label_column(rows: list[tuple[str, str]]) -> list[str]:
    """``Label:  value`` lines, the values in one column two spaces past the widest label, so
    no label touches its value whatever the labels (a fixed width printed
    ``Architecture:transformer``)."""
    width = max((len(label) for label, _ in rows), default=0) + len(":  ")
    return [f"{label + ':':<{width}}{value}" for label, value in rows]


async def cmd_inspect(args: argparse.Namespace) -> int:
    reference = parse(args.reference)
    async with _client(args, reference) as client:
        model, offline = await fetch_or_cached(client, _existing_cache(args), reference,
                                               trust=_trust(args, reference).listing())
    _warn_offline(offline)
    doc = describe(model)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    config = doc["config"].get("config", {})
    descriptor = doc["config"].get("descriptor", {})
    fields = (("Reference", model.reference), ("Name", descriptor.get("name")), ("Family", descriptor.get("family")),
              ("Architecture", config.get("architecture")), ("Format", config.get("format")),
              ("Param size", config.get("paramSize")), ("Precision", config.get("precision")),
              ("Quantization", config.get("quantization")), ("Created", descriptor.get("createdAt")))
    for line in label_column([(label, str(value)) for label, value in fields if value]):
        print(line)
    print(f"Layers ({len(model.manifest.layers)}, {sum(layer.size for layer in model.manifest.layers) / 1e6:,.1f} MB):")
    for layer in model.manifest.layers:
        print(f"  {layer.digest[7:19]}  {layer.size:>14,}  {layer.media_type.rsplit('.model.', 1)[-1]:<22} {layer.filepath or ''}")
    if model.verdict is not None:
        print("Signatures:", *(f"  {line}" for line in signing.listing(model.verdict)), sep="\n")
    return 0


async def cmd_pull(args: argparse.Namespace) -> int:
    reference = parse(args.reference)
    cache = BlockCache(args.cache_dir)
    async with _client(args, reference) as client:
        model, offline = await fetch_or_cached(client, cache, reference, trust=_trust(args, reference))
        if offline is not None:  # nothing to fetch if every blob is here and checked; else say why not
            if not held_whole(cache, model):
                raise UnavailableError(f"{offline}; not every blob of it is in the cache, so it cannot be pulled "
                                       "until the registry answers")
            _warn_offline(offline)
            print(f"Pulled {model.reference} into {args.cache_dir} (already complete there)")
            return 0
        await check_layer_sizes(client, model)
        index = await trusted_index(client, model)
        total = sum(layer.size for layer in model.manifest.layers)
        progress = _Progress(total, f"pull {reference}")
        async with trio.open_nursery() as nursery:
            fetcher = Fetcher(cache, client, reference.repository, nursery, index=index)
            readers = [fetcher.reader(layer.digest, layer.size) for layer in model.manifest.layers]
            record(cache, model, index.data if index else b"")
            try:
                await fetcher.prefetch(readers, progress, progress.skip)
                for reader in readers:
                    # every block read back and checked, whatever the cache's flags say
                    if not await reader.settle():
                        raise CacheError(f"blob {reader.digest} could not be stored whole and checked in "
                                         f"{args.cache_dir} (see the errors above; is the disk full?)")
            finally:
                nursery.cancel_scope.cancel()  # nothing left to wait for: end the fetch tasks' nursery now
        fetcher.close()
    cache.close()
    progress.finish()
    print(f"Pulled {model.reference} into {args.cache_dir}")
    return 0


async def cmd_index_attach(args: argparse.Namespace) -> int:
    reference = parse(args.reference)
    async with _client(args, reference, write=True) as client:
        model = await fetch_model(client, reference)
        result = await blockindex.attach_for_model(client, model)
    print(f"Attached a block index to {model.reference} ({result.blobs} blobs, {result.bytes / 1e6:,.1f} MB hashed): "
          f"{result.digest}")
    return 0


def cmd_cache_stats(args: argparse.Namespace) -> int:
    cache = BlockCache(args.cache_dir)
    usage = {u.digest: u for u in cache.usage()}
    kept_for_offline_mounts = ("manifest", "config", "media_type")
    models = [{k: v for k, v in m.items() if k not in kept_for_offline_mounts} for m in cache.models()]
    if args.json:
        print(json.dumps({"cache_dir": args.cache_dir, "models": models,
                          "blobs": [u.__dict__ for u in usage.values()]}, indent=2))
        return 0
    disk = sum(u.disk_bytes for u in usage.values())
    cached = sum(u.cached_bytes for u in usage.values())
    print(f"Cache {args.cache_dir}: {len(usage)} blobs, {cached / 1e6:,.1f} MB cached, {disk / 1e6:,.1f} MB on disk")
    for model in models:
        blobs = [usage[layer["digest"]] for layer in model["layers"] if layer["digest"] in usage]
        size = sum(layer["size"] for layer in model["layers"])
        have = sum(b.cached_bytes for b in blobs)
        print(f"  {model['reference']} ({model['digest'][:19]}): {have / 1e6:,.1f} of {size / 1e6:,.1f} MB cached"
              f" ({have / size if size else 1:.0%})")
    print(f"  {'blob':<19} {'size':>12} {'cached':>12} {'on disk':>12} {'lz4 saved':>10}  last used")
    for blob in sorted(usage.values(), key=lambda u: -u.last_used):
        saved = max(0, blob.cached_bytes - blob.disk_bytes)
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(blob.last_used))
        print(f"  {blob.digest[:19]} {blob.size:>12,} {blob.cached_bytes:>12,} {blob.disk_bytes:>12,} {saved:>10,}  {used}")
    return 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    if not args.all and args.keep_size is None:
        raise ModelfsError("cache prune needs --all or --keep-size SIZE")
    cache = BlockCache(args.cache_dir)
    usage = cache.usage()
    total = sum(u.disk_bytes for u in usage)
    keep = 0 if args.all else args.keep_size
    freed = 0
    for blob in usage:  # least recently used first
        if total - freed <= keep:
            break
        cache.evict(blob.digest)
        freed += blob.disk_bytes
    forgotten = f"; forgot {cache.forget_models()} model records" if args.all else ""
    print(f"Freed {freed / 1e6:,.1f} MB; {(total - freed) / 1e6:,.1f} MB left in {args.cache_dir}{forgotten}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    """Models in the local store (what ``build`` made, ready to ``push``)."""
    entries = Store(args.store).entries()
    if args.json:
        print(json.dumps([{"reference": r, "digest": d, "size": n} for r, d, n in entries], indent=2))
        return 0
    if not entries:
        print(f"No models in the local store {args.store}")
    for reference, digest, size in sorted(entries):
        print(f"{reference:<60} {digest[7:19]}  {size / 1e6:>12,.1f} MB")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = Store(args.store)
    for reference in args.references:
        removed = store.untag(str(parse(reference)))
        print(f"Untagged {reference} ({removed.digest})")
    print(f"Deleted {store.collect_garbage() / 1e6:,.1f} MB of blobs no model in {args.store} needs any more")
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    store = Store(args.store)
    source, target = str(parse(args.source)), str(parse(args.target))
    found = store.resolve(source)
    manifest = store.read_blob(found.digest)
    store.tag(target, manifest, json.loads(manifest).get("mediaType", OCI_MANIFEST))
    print(f"Tagged {source} as {target} ({found.digest})")
    return 0


async def cmd_extract(args: argparse.Namespace) -> int:
    reference = parse(args.reference)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ModelfsError(f"--output {args.output} is a file; name a directory (it is created if missing)")
    cache = _existing_cache(args)
    async with _client(args, reference) as client:
        model, offline = await fetch_or_cached(client, cache, reference, trust=_trust(args, reference))
        _warn_offline(offline)
        result = await extract(client, model, args.output, cache)
    print(f"Extracted {len(result.files)} files of {model.reference} to {args.output}")
    return 0


async def cmd_verify(args: argparse.Namespace) -> int:
    """Who signed what, and whether that meets the policy (exit 1 when not); nothing is fetched
    but the manifest, the config and the signatures."""
    reference = parse(args.reference)
    policy = _trust(args, reference, verifying=True)
    async with _client(args, reference) as client:
        model, offline = await fetch_or_cached(client, _existing_cache(args), reference, trust=policy.listing())
    _warn_offline(offline)
    verdict = model.verdict
    print(f"{model.reference}:", *(f"  {line}" for line in signing.listing(verdict)), sep="\n")
    if not verdict.met:
        raise SignatureError(verdict.refusal())
    print(f"Verified {model.reference}: {verdict.summary()}")
    return 0


async def cmd_sign(args: argparse.Namespace) -> int:
    from .signing.keys import load_private
    from .signing.sign import sign

    reference = parse(args.reference)
    password = sys.stdin.readline().rstrip("\n").encode() if args.password_stdin else None
    key = load_private(args.key, password)
    async with _client(args, reference, write=True) as client:
        model = await fetch_model(client, reference)
        result = await sign(client, model, key)
    print(f"Signed {model.reference} with {key.public().describe()}: referrer {result.referrer}")
    return 0


def _mount_options(args: argparse.Namespace) -> MountOptions:
    """Every mount setting resolved once, from the one table, for the reference's registry."""
    reference = parse(args.reference)
    values = {s.name: _setting(args, s.name, reference.registry) for s in settings.SETTINGS
              if s.name in MountOptions.__dataclass_fields__}
    values["cache_dir"] = args.cache_dir
    return MountOptions(reference=str(reference), mountpoint=args.mountpoint,
                        mirrors=args.config.registry(reference.registry).mirrors, trust=_trust(args, reference), **values)


def cmd_mount(args: argparse.Namespace) -> int:
    parse(args.reference)  # fail fast, before forking, on a malformed reference
    if args.foreground:
        if args.log_file:
            _setup_logging(_setting(args, "log_level") or "info", args.log_file, _setting(args, "log_max_size"))
        return _serve_mount(args, args.ready_fd)
    read_fd, write_fd = os.pipe()
    log_path = daemon_log_path(args.cache_dir, args.mountpoint)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _run_daemon(args, write_fd, log_path)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.readline().decode().strip()
        while message.startswith("NOTE "):  # a warning the daemon wants shown here (an unsigned model under warn)
            print(f"warning: {message.removeprefix('NOTE ')}", file=sys.stderr)
            message = pipe.readline().decode().strip()
    if message == "READY" or message.startswith("READY OFFLINE "):
        print(f"Mounted {args.reference} at {args.mountpoint} (pid {pid}, log {log_path})")
        if message.startswith("READY OFFLINE "):
            print(f"warning: offline: {message.removeprefix('READY OFFLINE ')}", file=sys.stderr)
        if _setting(args, "verify", parse(args.reference).registry) == "lazy":
            print("warning: --verify lazy: bytes of blobs without a trusted block index are served before they are "
                  "checked", file=sys.stderr)
        return 0
    returncode = _reap(pid, timeout=30)
    if message.startswith("ERROR "):
        raise parse_ready_failure(message)
    with open(log_path, "rb") as handle:
        tail = handle.read()[-2000:].decode(errors="replace").strip().splitlines()
    raise MountError(f"mount daemon exited ({returncode}) before the mount was ready: {tail[-1] if tail else 'no log'} (see {log_path})")


def _serve_mount(args: argparse.Namespace, ready_fd: int | None = None) -> int:
    options = _mount_options(args)
    options.ready_fd = ready_fd
    run_foreground(options)
    return 0


def _run_daemon(args: argparse.Namespace, ready_fd: int, log_path: str) -> NoReturn:
    """The forked background daemon: its own session, no terminal, stderr into its log.

    Forked rather than started afresh: this process has imported everything and resolved
    its settings already, and a second interpreter start cost 0.3-0.5 s of every mount's
    time to first byte here. The parent has started no thread and no trio run yet, so the
    fork copies one thread.
    """
    code = 1
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        _setup_logging(_setting(args, "log_level") or "info", log_path, _setting(args, "log_max_size"))
        code = _report_errors(lambda: _serve_mount(args, ready_fd))
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _reap(pid: int, timeout: float) -> int | None:
    """Exit status of a child that said it failed, waiting at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def cmd_status(args: argparse.Namespace) -> int:
    """Every modelfs mount of this host, from mountinfo and the status file its daemon writes
    each second (never from the mount itself: a frozen daemon cannot hang this)."""
    mounts: list[dict[str, Any]] = []
    for point, source in active_mounts():
        found = mount_status.read(point)
        if found is None:
            mounts.append({"mountpoint": point, "source": source, "answering": False})
        else:
            mounts.append({"source": source, **found})
    if args.json:
        print(json.dumps(mounts, indent=2))
        return 0
    if not mounts:
        print("No modelfs mounts")
    for mount in mounts:
        if "pid" not in mount:
            print(f"{mount['mountpoint']}: {mount['source']} (no status: its daemon is gone or stopped answering)")
            continue
        line = mount_status.MountStatus(**{k: v for k, v in mount.items() if k not in ("source", "answering")})
        stale = "" if mount["answering"] else ", NOT ANSWERING"
        print(f"{mount['mountpoint']}: {mount['reference']} ({line.digest[:19]}), pid {line.pid}: "
              f"{line.progress_line()}{stale}")
    return 0


def _host_metrics() -> str:
    mounts = [mount_status.read(point) or {"mountpoint": point, "answering": False} for point, _ in active_mounts()]
    return render_host(mounts)


async def cmd_metrics(args: argparse.Namespace) -> int:
    """The metrics of every modelfs mount of this host, from one place: printed once, or
    served (``--listen``) for Prometheus, instead of one port per mount."""
    if args.listen is None:
        print(_host_metrics(), end="")
        return 0
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_metrics, args.listen, _host_metrics)
        print(f"Serving the metrics of every modelfs mount on http://{args.listen}/metrics", flush=True)
    return 0


async def cmd_csi(args: argparse.Namespace) -> int:
    """The Kubernetes CSI node plugin, until SIGTERM (mounts stay: see modelfs/csi/)."""
    from .csi.node import NodeOptions
    from .csi.server import serve

    node_id = args.node_id or os.environ.get("NODE_NAME") or socket.gethostname()
    options = NodeOptions(node_id=node_id, cache_dir=args.cache_dir, state_dir=args.state_dir,
                          publish_timeout=args.publish_timeout, check_interval=args.check_interval)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, options, args.endpoint)
            async for signum in signals:
                log.info("%s: stopping; published mounts keep serving", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    print(f"{umount(args.mountpoint).capitalize()} {args.mountpoint}")
    return 0


# -- parser ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    settings.add_flags(common, common=True)
    common.add_argument("--store", default=os.environ.get("MODELFS_STORE") or default_store_dir(),
                        help="local OCI layout that build writes and push reads")

    parser = argparse.ArgumentParser(prog="modelfs", description="Lazy-loading filesystem for ModelPack OCI models")
    parser.add_argument("--version", action="version", version=f"modelfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("login", parents=[common], help="store credentials for a registry")
    p.add_argument("registry")
    p.add_argument("-u", "--username", required=True)
    p.add_argument("-p", "--password")
    p.add_argument("--password-stdin", action="store_true")
    p.set_defaults(handler=cmd_login)

    p = sub.add_parser("logout", parents=[common], help="forget a registry's credentials")
    p.add_argument("registry")
    p.set_defaults(handler=cmd_logout)

    p = sub.add_parser("build", parents=[common], help="build a model artifact from a Modelfile")
    p.add_argument("-t", "--tag", required=True)
    p.add_argument("-f", "--file", help="Modelfile (default: CONTEXT/Modelfile)")
    p.add_argument("--packing", default="raw", choices=[p.value for p in Packing],
                   help="layer format: raw (modctl's default) or tar[+gzip|+zstd]")
    p.add_argument("--no-block-index", action="store_true",
                   help="do not name a per-block hash index in the manifest (mounts then serve each blob "
                        "only once it has been checked whole)")
    p.add_argument("context")
    p.set_defaults(handler=cmd_build, directories={"store": WRITE})

    p = sub.add_parser("push", parents=[common], help="upload a built model")
    p.add_argument("reference")
    p.add_argument("--source", help="name in the local store, if not REFERENCE")
    p.add_argument("--chunk-size", type=lambda v: settings.parse_count(v, "--chunk-size", 1, 1 << 20), default=512,
                   metavar="MiB",
                   help="blobs larger than this are uploaded in chunks of this size (default 512)")
    p.add_argument("--no-block-index", action="store_true",
                   help="do not upload the block index the manifest names (nor its referrer)")
    p.set_defaults(handler=cmd_push, directories={"store": READ})

    p = sub.add_parser("inspect", parents=[common], help="show a model's manifest and config")
    p.add_argument("reference")
    p.add_argument("--json", action="store_true")
    settings.add_flags(p, common=False, command="inspect")
    p.set_defaults(handler=cmd_inspect, directories={"cache_dir": READ})

    p = sub.add_parser("pull", parents=[common], help="download a model into the block cache")
    p.add_argument("reference")
    settings.add_flags(p, common=False, command="pull")
    p.set_defaults(handler=cmd_pull, directories={"cache_dir": WRITE})

    p = sub.add_parser("verify", parents=[common], help="check a model's signatures against a policy (exit 1 if unmet)")
    p.add_argument("reference")
    settings.add_flags(p, common=False, command="verify")
    p.set_defaults(handler=cmd_verify, directories={"cache_dir": READ})

    p = sub.add_parser("sign", parents=[common], help="sign a model's manifest digest and attach the signature "
                                                      "(cosign-compatible)")
    p.add_argument("reference")
    p.add_argument("--key", required=True, metavar="PRIVATE.pem", help="private key (PEM: ECDSA, Ed25519 or RSA)")
    p.add_argument("--password-stdin", action="store_true", help="read the key's password from standard input")
    p.set_defaults(handler=cmd_sign)

    p = sub.add_parser("index", help="block indexes: what makes lazy reads verifiable")
    index_sub = p.add_subparsers(dest="index_command", required=True)
    q = index_sub.add_parser("attach", parents=[common],
                             help="hash a model already pushed (by any tool) block by block and attach the index")
    q.add_argument("reference")
    q.set_defaults(handler=cmd_index_attach)

    p = sub.add_parser("ls", parents=[common], help="list the models in the local store (built, ready to push)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_ls, directories={"store": READ})

    p = sub.add_parser("rm", parents=[common], help="remove models from the local store (and blobs no other needs)")
    p.add_argument("references", nargs="+", metavar="REFERENCE")
    p.set_defaults(handler=cmd_rm, directories={"store": WRITE})

    p = sub.add_parser("tag", parents=[common], help="name a model of the local store again")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("target", metavar="TARGET")
    p.set_defaults(handler=cmd_tag, directories={"store": WRITE})

    p = sub.add_parser("extract", parents=[common], help="write a model's files to a directory")
    p.add_argument("reference")
    p.add_argument("-o", "--output", required=True)
    settings.add_flags(p, common=False, command="extract")
    p.set_defaults(handler=cmd_extract, directories={"cache_dir": READ})

    p = sub.add_parser("mount", parents=[common], help="mount a model (files fetched on demand)")
    p.add_argument("reference")
    p.add_argument("mountpoint")
    p.add_argument("--foreground", action="store_true", help="stay attached (for systemd and supervisors)")
    # For a supervisor that starts foreground daemons itself (``modelfs csi``): the daemon writes
    # READY or ``ERROR Kind: message`` on this descriptor, and logs to a rotated file.
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--log-file", help=argparse.SUPPRESS)
    settings.add_flags(p, common=False)
    p.set_defaults(handler=cmd_mount, directories={"cache_dir": WRITE})

    p = sub.add_parser("cache", help="inspect and prune the block cache")
    cache_sub = p.add_subparsers(dest="cache_command", required=True)
    q = cache_sub.add_parser("stats", parents=[common], help="per model and blob: size, cached, on disk, last use")
    q.add_argument("--json", action="store_true")
    q.set_defaults(handler=cmd_cache_stats, directories={"cache_dir": READ})
    q = cache_sub.add_parser("prune", parents=[common], help="evict least recently used blobs")
    q.add_argument("--all", action="store_true", help="empty the cache")
    q.add_argument("--keep-size", type=lambda v: parse_size(v, "--keep-size"), metavar="SIZE",
                   help="evict until at most SIZE bytes stay on disk (e.g. 50G)")
    q.set_defaults(handler=cmd_cache_prune, directories={"cache_dir": WRITE})

    p = sub.add_parser("status", parents=[common], help="list active modelfs mounts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("metrics", parents=[common], help="Prometheus metrics of every mount of this host")
    p.add_argument("--listen", type=lambda v: settings.parse_address(v, "--listen"), metavar="HOST:PORT",
                   help="serve them here until stopped (default: print them once)")
    p.set_defaults(handler=cmd_metrics)

    p = sub.add_parser("csi", parents=[common], help="run the Kubernetes CSI node plugin (see deploy/kubernetes)")
    p.add_argument("--endpoint", default="unix:///csi/csi.sock", help="the gRPC socket (default: %(default)s)")
    p.add_argument("--node-id", help="this node's name (default: $NODE_NAME, else the host name)")
    p.add_argument("--state-dir", default="/run/modelfs/csi",
                   help="where published volumes are recorded, with their credentials: a tmpfs (default: %(default)s)")
    p.add_argument("--publish-timeout", type=lambda v: settings.parse_seconds(v, "--publish-timeout"), default=100.0,
                   metavar="SECONDS", help="longest a publish waits for its mount to answer (default: %(default)s)")
    p.add_argument("--check-interval", type=lambda v: settings.parse_seconds(v, "--check-interval"), default=10.0,
                   metavar="SECONDS", help="how often mounts whose daemon died are mounted again (default: %(default)s)")
    p.set_defaults(handler=cmd_csi, directories={"cache_dir": WRITE, "state_dir": WRITE})

    p = sub.add_parser("umount", parents=[common], help="unmount (also cleans a stale mount)")
    p.add_argument("mountpoint")
    p.set_defaults(handler=cmd_umount)
    return parser


_IGNORED_MOUNT_OPTIONS = {"ro", "defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail",
                          "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime", "async"}
def mount_helper_argv(argv: list[str]) -> list[str]:
    """Translate the ``mount.fuse3`` form ``modelfs REF DIR -o opt,opt=v`` into ``mount`` flags.

    This is what ``mount -t fuse.modelfs REF DIR -o ...`` and ``/etc/fstab`` lines run.
    """
    positional: list[str] = []
    options: list[str] = []
    items = iter(argv)
    for item in items:
        if item == "-o":
            options.extend(o for o in next(items, "").split(",") if o)
        elif item.startswith("-o"):
            options.extend(o for o in item[2:].split(",") if o)
        else:
            positional.append(item)
    if len(positional) != 2:
        raise ModelfsError("mount helper form is: modelfs REFERENCE MOUNTPOINT [-o options]")
    flags: list[str] = []
    for option in options:
        key, has_value, value = option.partition("=")
        if key in _IGNORED_MOUNT_OPTIONS:
            continue
        if key == "rw":
            raise ModelfsError("modelfs mounts are read-only; drop 'rw' from the mount options")
        flags.extend(settings.fstab_flags(option))
    return ["mount", *flags, *positional]


READ, WRITE = False, True  # how a command uses a directory it is given
# the directories a command may declare (set_defaults(directories=...)): how the user hears of each
DIRECTORIES = {"cache_dir": ("cache directory", "--cache-dir"), "store": ("local store", "--store"),
               "state_dir": ("state directory", "--state-dir")}


def _check_directories(args: argparse.Namespace) -> None:
    """Each directory the command uses, checked first and the same way (:mod:`modelfs.dirs`)."""
    for name, write in getattr(args, "directories", {}).items():
        check_directory(getattr(args, name), *DIRECTORIES[name], write=write)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = _parser()
        commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if argv and not argv[0].startswith("-") and argv[0] not in (commands or {}):
            argv = mount_helper_argv(argv)
        args = parser.parse_args(argv)  # a bad value (a size like 10Q) is one line, not a traceback
    except ModelfsError as exc:
        print(f"modelfs: error: {exc}", file=sys.stderr)
        return 2
    daemon = (args.handler is cmd_mount and args.foreground) or args.handler is cmd_csi
    _setup_logging(args.log_level or ("info" if daemon else "warning"))

    def run() -> int:
        _resolve_settings(args)
        _check_directories(args)  # before anything writes there (a mount's log, a pull's blobs)
        if args.log_level is None and args.config.log_level:  # the config's level, now that it is read
            _setup_logging(args.config.log_level)
        if inspect.iscoroutinefunction(args.handler):
            return trio.run(args.handler, args)
        return args.handler(args)

    return _report_errors(run, PERMANENT_FAILURE if daemon else 1)


# The exit status of a mount daemon (``mount --foreground``, as systemd runs it) that failed in
# a way restarting cannot cure: a bad reference, refused credentials, not a model, a TLS or
# configuration mistake. The unit lists it in RestartPreventExitStatus= instead of restarting
# every few seconds for ever; an unreachable registry exits 1 and is restarted.
PERMANENT_FAILURE = 78  # EX_CONFIG
PERMANENT_ERRORS = (InvalidReferenceError, AuthenticationError, NotAModelError, ManifestError, NotFoundError, TLSError,
                    ConfigError, UnsafePathError, SignatureError)


def _report_errors(run: Callable[[], int], permanent_status: int = 1) -> int:
    """Run a command; an error the user can act on becomes one line on stderr and exit 1
    (``permanent_status`` for one that trying again cannot cure)."""
    try:
        return run()
    except (ModelfsError, BaseExceptionGroup) as exc:
        if isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is not None:
            return _interrupted()
        error = user_error(exc)
        if error is None:
            raise
        print(f"modelfs: error: {error}", file=sys.stderr)
        return permanent_status if isinstance(error, PERMANENT_ERRORS) else 1
    except KeyboardInterrupt:
        return _interrupted()
    except BrokenPipeError:  # `modelfs cache stats | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141


def _interrupted() -> int:
    print("modelfs: interrupted (Ctrl-C); nothing half-done is kept as if complete", file=sys.stderr)
    return 130
