"""``mount``, and the daemon it starts (forked, or in the foreground for systemd and the CSI
plugin)."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import replace
from typing import NoReturn

from ..compose import model_view
from ..errors import MountError, parse_ready_failure
from ..logfile import daemon_log_path
from ..mount.daemon import MountOptions, run_foreground
from ..reference import parse
from .base import report_errors, settings_for, setup_logging


def mount_options(args: argparse.Namespace) -> MountOptions:
    """Every mount setting resolved once, from the one table, for the reference's registry and
    repository (the daemon builds its parts from them: :mod:`modelfs.compose`)."""
    reference = parse(args.reference)
    node_view = None
    if args.view_narrows_config:  # the config's own view, the flags' left out (a CSI pod's: doc/KUBERNETES.md)
        config_only = argparse.Namespace(**(vars(args) | {"include": None, "exclude": None}))
        node_view = model_view(settings_for(config_only, reference.registry, reference.repository))
    settings = settings_for(args, reference.registry, reference.repository)
    model_view(settings, node_view)  # a bad view (too many patterns) refused before forking
    return MountOptions(reference=str(reference), mountpoint=args.mountpoint, node_view=node_view, settings=settings)


def cmd_mount(args: argparse.Namespace) -> int:
    options = mount_options(args)  # fails fast, before forking, on a malformed reference
    if args.foreground:
        if args.log_file:
            setup_logging(options.settings.log_level or "info", args.log_file, options.settings.log_max_size)
        return _serve_mount(replace(options, ready_fd=args.ready_fd))
    read_fd, write_fd = os.pipe()
    log_path = daemon_log_path(options.settings.cache_dir, args.mountpoint)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _run_daemon(replace(options, ready_fd=write_fd), log_path)
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
        if options.settings.verify == "lazy":
            print("warning: --verify lazy: bytes of blobs without a trusted block index are served before they are "
                  "checked", file=sys.stderr)
        _leave_now()
    returncode = _reap(pid, timeout=30)
    if message.startswith("ERROR "):
        raise parse_ready_failure(message)
    with open(log_path, "rb") as handle:
        tail = handle.read()[-2000:].decode(errors="replace").strip().splitlines()
    raise MountError(f"mount daemon exited ({returncode}) before the mount was ready: {tail[-1] if tail else 'no log'} (see {log_path})")


def _leave_now() -> NoReturn:
    """The mount is live and said so: exit without tearing the interpreter down. This process
    imported the whole data path for the daemon it forked, and its teardown took 0.1-0.3 s of
    a 0.7-1.0 s ``modelfs mount`` here, time a loader started after it waited for nothing."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _serve_mount(options: MountOptions) -> int:
    run_foreground(options)
    return 0


def _run_daemon(options: MountOptions, log_path: str) -> NoReturn:
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
        setup_logging(options.settings.log_level or "info", log_path, options.settings.log_max_size)
        code = report_errors(lambda: _serve_mount(options))
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
