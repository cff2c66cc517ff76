"""The ``modelfs`` command line: the parser, and the dispatch to the command that runs.

Each command lives in a module of :mod:`modelfs.commands`, imported only when that command
runs (``handler="module.function"`` below), so ``modelfs --help`` and ``--version`` start
without the mount's data path, the registry client or gRPC (tests/test_cli.py keeps it so).
Every failure a user can cause prints one line, ``modelfs: error: ...``, and exits non-zero
(:mod:`modelfs.commands.base`).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from . import __version__, settings
from .artifact.layout import default_store_dir
from .commands.base import PERMANENT_FAILURE, report_errors, settings_for, setup_logging
from .commands.stops import run_stoppable, stop_on_sigterm
from .config import Config, parse_size
from .config import load as load_config
from .dirs import check_directory
from .errors import ModelfsError
from .formats.spec import Packing


def _resolve_settings(args: argparse.Namespace, config: Config | None = None) -> None:
    """Flags override the config files, which override the built-in defaults (one table:
    :mod:`modelfs.settings`). The cache directory may also come from MODELFS_CACHE_DIR.
    Settings that may differ per registry are resolved again for it, by the command
    (:func:`modelfs.commands.base.settings_for`)."""
    args.config = config or load_config()
    args.cache_dir = settings_for(args).cache_dir


def handler(args: argparse.Namespace) -> Callable[[argparse.Namespace], Any]:
    """The function of the command ``args`` names, its module imported now."""
    module, _, name = args.handler.rpartition(".")
    return getattr(importlib.import_module(f"{__package__}.commands.{module}"), name)  # type: ignore[no-any-return]


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
    p.set_defaults(handler="registry.cmd_login")

    p = sub.add_parser("logout", parents=[common], help="forget a registry's credentials")
    p.add_argument("registry")
    p.set_defaults(handler="registry.cmd_logout")

    p = sub.add_parser("build", parents=[common], help="build a model artifact from a Modelfile")
    p.add_argument("-t", "--tag", required=True)
    p.add_argument("-f", "--file", help="Modelfile (default: CONTEXT/Modelfile)")
    p.add_argument("--packing", default="raw", choices=[p.value for p in Packing],
                   help="layer format: raw (modctl's default) or tar[+gzip|+zstd]")
    p.add_argument("--no-block-index", action="store_true",
                   help="do not name a per-block hash index in the manifest (mounts then serve each blob "
                        "only once it has been checked whole)")
    p.add_argument("context")
    p.set_defaults(handler="store.cmd_build", directories={"store": WRITE})

    p = sub.add_parser("push", parents=[common], help="upload a built model")
    p.add_argument("reference")
    p.add_argument("--source", help="name in the local store, if not REFERENCE")
    p.add_argument("--chunk-size", type=lambda v: settings.parse_count(v, "--chunk-size", 1, 1 << 20), default=512,
                   metavar="MiB",
                   help="blobs larger than this are uploaded in chunks of this size (default 512)")
    p.add_argument("--no-block-index", action="store_true",
                   help="do not upload the block index the manifest names (nor its referrer)")
    p.set_defaults(handler="registry.cmd_push", directories={"store": READ})

    p = sub.add_parser("inspect", parents=[common], help="show a model's manifest and config")
    p.add_argument("reference")
    p.add_argument("--json", action="store_true")
    settings.add_flags(p, common=False, command="inspect")
    p.set_defaults(handler="models.cmd_inspect", directories={"cache_dir": READ})

    p = sub.add_parser("pull", parents=[common], help="download a model into the block cache")
    p.add_argument("reference")
    settings.add_flags(p, common=False, command="pull")
    p.set_defaults(handler="models.cmd_pull", directories={"cache_dir": WRITE})

    p = sub.add_parser("verify", parents=[common], help="check a model's signatures against a policy (exit 1 if unmet)")
    p.add_argument("reference")
    settings.add_flags(p, common=False, command="verify")
    p.set_defaults(handler="signatures.cmd_verify", directories={"cache_dir": READ})

    p = sub.add_parser("sign", parents=[common], help="sign a model's manifest digest and attach the signature "
                                                      "(cosign-compatible)")
    p.add_argument("reference")
    # its own name: not the signature setting ``key`` (public keys a policy names)
    p.add_argument("--key", dest="private_key", required=True, metavar="PRIVATE.pem",
                   help="private key (PEM: ECDSA, Ed25519 or RSA)")
    p.add_argument("--password-stdin", action="store_true", help="read the key's password from standard input")
    p.set_defaults(handler="signatures.cmd_sign")

    p = sub.add_parser("index", help="block indexes: what makes lazy reads verifiable")
    index_sub = p.add_subparsers(dest="index_command", required=True)
    q = index_sub.add_parser("attach", parents=[common],
                             help="hash a model already pushed (by any tool) block by block and attach the index")
    q.add_argument("reference")
    q.set_defaults(handler="registry.cmd_index_attach")

    p = sub.add_parser("ls", parents=[common], help="list the models in the local store (built, ready to push)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler="store.cmd_ls", directories={"store": READ})

    p = sub.add_parser("rm", parents=[common], help="remove models from the local store (and blobs no other needs)")
    p.add_argument("references", nargs="+", metavar="REFERENCE")
    p.set_defaults(handler="store.cmd_rm", directories={"store": WRITE})

    p = sub.add_parser("tag", parents=[common], help="name a model of the local store again")
    p.add_argument("source", metavar="SOURCE")
    p.add_argument("target", metavar="TARGET")
    p.set_defaults(handler="store.cmd_tag", directories={"store": WRITE})

    p = sub.add_parser("extract", parents=[common], help="write a model's files to a directory")
    p.add_argument("reference")
    p.add_argument("-o", "--output", required=True)
    settings.add_flags(p, common=False, command="extract")
    p.set_defaults(handler="models.cmd_extract", directories={"cache_dir": READ})

    p = sub.add_parser("mount", parents=[common], help="mount a model (files fetched on demand)")
    p.add_argument("reference")
    p.add_argument("mountpoint")
    p.add_argument("--foreground", action="store_true", help="stay attached (for systemd and supervisors)")
    # For a supervisor that starts foreground daemons itself (``modelfs csi``): the daemon writes
    # READY or ``ERROR Kind: message`` on this descriptor, and logs to a rotated file.
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.add_argument("--log-file", help=argparse.SUPPRESS)
    # ``modelfs csi``: a pod's --include / --exclude narrow the node config's view, never replace it
    p.add_argument("--view-narrows-config", action="store_true", help=argparse.SUPPRESS)
    settings.add_flags(p, common=False)
    p.set_defaults(handler="mount.cmd_mount", directories={"cache_dir": WRITE})

    p = sub.add_parser("cache", help="inspect and prune the block cache")
    cache_sub = p.add_subparsers(dest="cache_command", required=True)
    q = cache_sub.add_parser("stats", parents=[common], help="per model and blob: size, cached, on disk, last use")
    q.add_argument("--json", action="store_true")
    q.set_defaults(handler="cache.cmd_cache_stats", directories={"cache_dir": READ})
    q = cache_sub.add_parser("prune", parents=[common], help="evict least recently used blobs")
    q.add_argument("--all", action="store_true", help="empty the cache")
    q.add_argument("--keep-size", type=lambda v: parse_size(v, "--keep-size"), metavar="SIZE",
                   help="evict until at most SIZE bytes stay on disk (e.g. 50G)")
    q.set_defaults(handler="cache.cmd_cache_prune", directories={"cache_dir": WRITE})

    p = sub.add_parser("status", parents=[common], help="list active modelfs mounts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler="host.cmd_status")

    p = sub.add_parser("metrics", parents=[common], help="Prometheus metrics of every mount of this host")
    p.add_argument("--listen", type=lambda v: settings.parse_address(v, "--listen"), metavar="HOST:PORT",
                   help="serve them here until stopped (default: print them once)")
    p.set_defaults(handler="host.cmd_metrics")

    p = sub.add_parser("csi", parents=[common], help="run the Kubernetes CSI node plugin (see deploy/kubernetes)")
    p.add_argument("--endpoint", default="unix:///csi/csi.sock", help="the gRPC socket (default: %(default)s)")
    p.add_argument("--node-id", help="this node's name (default: $NODE_NAME, else the host name)")
    p.add_argument("--state-dir", default="/run/modelfs/csi",
                   help="where published volumes are recorded, with their credentials: a tmpfs (default: %(default)s)")
    p.add_argument("--publish-timeout", type=lambda v: settings.parse_seconds(v, "--publish-timeout"), default=100.0,
                   metavar="SECONDS", help="longest a publish waits for its mount to answer (default: %(default)s)")
    p.add_argument("--check-interval", type=lambda v: settings.parse_seconds(v, "--check-interval"), default=10.0,
                   metavar="SECONDS", help="how often mounts whose daemon died are mounted again (default: %(default)s)")
    p.set_defaults(handler="csi.cmd_csi", directories={"cache_dir": WRITE, "state_dir": WRITE})

    p = sub.add_parser("umount", parents=[common], help="unmount (also cleans a stale mount)")
    p.add_argument("mountpoint")
    p.set_defaults(handler="host.cmd_umount")
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
    daemon = (args.command == "mount" and args.foreground) or args.command == "csi"
    setup_logging(args.log_level or ("info" if daemon else "warning"))

    def run() -> int:
        _resolve_settings(args)
        _check_directories(args)  # before anything writes there (a mount's log, a pull's blobs)
        if args.log_level is None and args.config.log_level:  # the config's level, now that it is read
            setup_logging(args.config.log_level)
        command = handler(args)
        if inspect.iscoroutinefunction(command):
            return run_stoppable(command, args)
        return command(args)

    if args.command not in ("mount", "csi"):  # each of those stops its own way
        stop_on_sigterm()
    return report_errors(run, PERMANENT_FAILURE if daemon else 1, args.command, getattr(args, "reference", None))
