"""The Node service's logic, on trio: publish, unpublish, and mounting again what died.

Every change to one target path happens under that target's lock, so kubelet's retries, its
unpublish racing a slow publish, and the recovery pass never interleave on a target. What is
published is recorded (:mod:`.records`) before its daemon starts, and the record goes only
once the target is clean, so a plugin killed at any point finds on its next start every
target it may have left mounted.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import trio

from ..errors import (
    AuthenticationError,
    IntegrityError,
    InvalidReferenceError,
    ManifestError,
    ModelfsError,
    NotAModelError,
    NotFoundError,
    RegistryError,
    SignatureError,
    TLSError,
    UnsafePathError,
)
from ..logfile import LOG_BACKUPS, daemon_log_path
from ..mount import table
from ..mount.table import DETACHED_BUSY
from ..settings import ConfigError
from . import daemons
from .records import Record, Records
from .volume import InvalidVolume, VolumeSpec, parse_publish

log = logging.getLogger("modelfs.csi")


class RequestFailed(ModelfsError):
    """A request refused for a reason with a gRPC code of its own (a target taken, say)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# The gRPC code kubelet gets for each kind of failure, most specific first.
STATUS_CODES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], grpc.StatusCode], ...] = (
    # the node's signature policy refuses the model: final for kubelet (not an "in progress" code), and the
    # message names the signature and why
    (SignatureError, grpc.StatusCode.PERMISSION_DENIED),
    (AuthenticationError, grpc.StatusCode.PERMISSION_DENIED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    ((InvalidVolume, InvalidReferenceError, NotAModelError, ManifestError, UnsafePathError, ConfigError),
     grpc.StatusCode.INVALID_ARGUMENT),
    (daemons.PublishTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (TLSError, grpc.StatusCode.FAILED_PRECONDITION),
    (IntegrityError, grpc.StatusCode.DATA_LOSS),
    (RegistryError, grpc.StatusCode.UNAVAILABLE),
)


def status_code(error: ModelfsError) -> grpc.StatusCode:
    if isinstance(error, RequestFailed):
        return error.code
    return next((code for kinds, code in STATUS_CODES if isinstance(error, kinds)), grpc.StatusCode.INTERNAL)


@dataclass(frozen=True)
class NodeOptions:
    node_id: str
    cache_dir: str
    state_dir: str
    publish_timeout: float = 100.0  # kubelet gives a publish 2 minutes
    check_interval: float = 10.0  # how often dead mounts are looked for


RECOVER_AT_ONCE = 8  # a restarted plugin mounts this many dead targets at a time


class Node:
    def __init__(self, options: NodeOptions, nursery: trio.Nursery) -> None:
        self.options = options
        self.records = Records(options.state_dir)
        self._nursery = nursery  # where the daemons this plugin started are waited for
        self._locks: dict[str, trio.Lock] = {}

    @asynccontextmanager
    async def _holding(self, target: str) -> AsyncIterator[None]:
        """The target's lock, dropped once no record and no waiter needs it (pods come and go)."""
        lock = self._locks.setdefault(target, trio.Lock())
        async with lock:
            yield
            with contextlib.suppress(ModelfsError):  # an unreadable record keeps its lock
                if not lock.statistics().tasks_waiting and self.records.load(target) is None:
                    self._locks.pop(target, None)

    async def publish(self, request: Any, time_left: float | None) -> str:
        """Mount the pod's model at its target; returns what was done."""
        spec = parse_publish(request)
        timeout = self.options.publish_timeout if time_left is None else min(self.options.publish_timeout,
                                                                              max(1.0, time_left - 2))
        async with self._holding(spec.target):
            record = self.records.load(spec.target)
            if record is None:
                if table.at(spec.target) is not None:
                    raise RequestFailed(grpc.StatusCode.ALREADY_EXISTS,
                                        f"{spec.target} is already a mount point, and not one this plugin published")
                await self._mount(spec, timeout)
                return "mounted"
            if not spec.same_volume(record.volume_id, record.attributes):
                raise RequestFailed(grpc.StatusCode.ALREADY_EXISTS,
                                    f"{spec.target} already holds volume {record.volume_id} "
                                    f"({record.attributes.get('reference')}) with other attributes; unpublish it first")
            now = await daemons.state(spec.target)
            if now in ("serving", "frozen"):
                self.records.save(spec, record.pid, record.pid_started)  # a rotated secret is kept for next time
                return "already published"
            log.warning("publish of %s at %s again: its mount was %s", spec.reference, spec.target, now)
            await daemons.detach(spec.target)
            await self._mount(spec, timeout)
            return "mounted again"

    async def _mount(self, spec: VolumeSpec, seconds: float, forget_on_failure: bool = True) -> None:
        directory = self.records.save(spec)  # first: a plugin killed mid-start mounts it again on its next start
        try:
            with trio.move_on_after(seconds) as waiting:
                started = await daemons.start(spec, self.options.cache_dir, directory)
            if waiting.cancelled_caught:
                log_path = daemon_log_path(self.options.cache_dir, spec.target)
                raise daemons.PublishTimeout(f"the mount of {spec.reference} did not answer within {seconds:g}s "
                                             f"({daemons.last_log_line(log_path)}); kubelet will ask again")
        except BaseException:
            if forget_on_failure:
                self.records.remove(spec.target)
                _remove_target(spec.target, must=False)
            raise
        self.records.save(spec, started.pid, started.pid_started)
        if started.offline:
            log.warning("%s at %s serves from the cache alone: %s", spec.reference, spec.target, started.offline)
        self._nursery.start_soon(self._reap, started, spec.target)

    async def _reap(self, started: daemons.Started, target: str) -> None:
        """Wait for a daemon this plugin started (no zombie stays), and say if it died serving
        (under the target's lock: an unpublish in progress has not removed the record yet)."""
        code = await started.process.wait()
        async with self._holding(target):
            try:
                record = self.records.load(target)
            except ModelfsError as exc:  # an unreadable record: the recovery pass says so too
                log.error("%s", exc)
                return
        if record is not None and record.pid == started.pid:
            log.error("the mount daemon of %s (pid %d) exited with status %d while published; it will be mounted "
                      "again within %gs", target, started.pid, code, self.options.check_interval)

    async def unpublish(self, volume_id: str, target: str) -> str:
        """Unmount and remove the target, whatever state its daemon is in; a repeat succeeds."""
        if not volume_id or not target.startswith("/"):
            raise InvalidVolume("volume_id and an absolute target_path are required")
        async with self._holding(target):
            record = self.records.load(target)
            if record is not None and record.volume_id != volume_id:
                raise RequestFailed(grpc.StatusCode.NOT_FOUND, f"{target} holds volume {record.volume_id}, not {volume_id}")
            return await self._clean(target, record)

    async def _clean(self, target: str, record: Record | None) -> str:
        found = table.at(target)  # the mount table, asked with the target resolved as it resolves paths
        if found is not None and not found.is_modelfs:
            raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION, f"{target} is a mount point that is not modelfs's; "
                                "left as it is")
        done = await daemons.detach(target)
        if record is not None and done == DETACHED_BUSY:
            log.info("the daemon of %s (pid %d) serves the files still open there, then exits", target, record.pid)
        elif record is not None:
            await daemons.stop(record.pid, record.pid_started)
        _remove_target(target, must=True)
        self.records.remove(target)
        _remove_log(daemon_log_path(self.options.cache_dir, target))
        return done

    async def recover(self) -> None:
        """One pass over the records: mount again every target whose daemon is gone, forget
        those whose pod is gone (kubelet removed the volume's directory)."""
        limiter = trio.CapacityLimiter(RECOVER_AT_ONCE)
        async with trio.open_nursery() as nursery:
            for record in self.records.all():
                nursery.start_soon(self._recover_one, record.target, limiter)

    async def _recover_one(self, target: str, limiter: trio.CapacityLimiter) -> None:
        async with limiter, self._holding(target):
            try:
                current = self.records.load(target)
            except ModelfsError as exc:
                log.error("%s", exc)
                return
            if current is None:
                return  # unpublished meanwhile
            try:
                await self._recover(current)
            except ModelfsError as exc:
                log.error("cannot mount %s again (will retry in %gs): %s", target, self.options.check_interval, exc)
            except Exception:  # a bug, or a damaged record: logged; the plugin keeps serving kubelet
                log.exception("cannot mount %s again (will retry in %gs)", target, self.options.check_interval)

    async def _recover(self, record: Record) -> None:
        if not os.path.isdir(os.path.dirname(record.target)):
            log.info("forgetting %s: its pod's volume directory is gone", record.target)
            await self._clean(record.target, record)
            return
        now = await daemons.state(record.target)
        if now == "serving":
            return
        if now == "frozen":
            log.warning("the mount at %s does not answer a stat; leaving it", record.target)
            return
        log.warning("mounting %s again at %s: its daemon is gone (%s)", record.attributes.get("reference"), record.target,
                    now)
        await daemons.detach(record.target)
        await self._mount(self.records.spec(record), self.options.publish_timeout, forget_on_failure=False)
        log.info("%s serves again", record.target)

    async def keep_recovering(self) -> None:
        while True:
            await self.recover()
            await trio.sleep(self.options.check_interval)


def _remove_target(target: str, must: bool) -> None:
    """The target directory the plugin created (the CSI spec has the plugin delete it)."""
    try:
        os.rmdir(target)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if must:
            raise RequestFailed(grpc.StatusCode.FAILED_PRECONDITION,
                                f"cannot remove {target} after unmounting it: {exc.strerror}") from None


def _remove_log(path: str) -> None:
    """A gone volume's daemon log, rotated copies too: pods come and go, and one log per pod
    ever run would fill the node. What kubelet was told stays in the plugin's own log."""
    for name in (path, *(f"{path}.{n}" for n in range(1, LOG_BACKUPS + 1))):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
