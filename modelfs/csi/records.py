"""What this node has published, kept on the node so a restarted plugin knows it.

One directory per target path under ``STATE_DIR/volumes`` (mode 0700): ``volume.json`` (the
volume, its attributes and the daemon serving it) and, when the pod gave credentials,
``config.json`` (0600), which is also the mount daemon's ``DOCKER_CONFIG``: the daemon reads
credentials from it whenever the registry asks again, and a plugin that restarts mounts again
with them although kubelet will not send the secret again. The deployment keeps the state
directory on the host's ``/run`` (a tmpfs), so credentials never reach a disk and a reboot,
which ends every pod anyway, forgets them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any

from ..atomic import atomic_write
from ..errors import ModelfsError
from .volume import VolumeSpec, parse_attributes

log = logging.getLogger("modelfs.csi")


@dataclass(frozen=True)
class Record:
    volume_id: str
    target: str
    attributes: dict[str, str]
    pid: int = 0  # the mount daemon serving the target
    pid_started: int = 0  # its start time (/proc/PID/stat), so a reused pid is never taken for it


class Records:
    def __init__(self, state_dir: str) -> None:
        self.root = os.path.join(state_dir, "volumes")
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)

    def directory(self, target: str) -> str:
        return os.path.join(self.root, hashlib.sha256(target.encode()).hexdigest()[:32])

    def save(self, spec: VolumeSpec, pid: int = 0, pid_started: int = 0) -> str:
        """Record a volume (credentials first, so a record never lacks them); returns its directory."""
        directory = self.directory(spec.target)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if spec.docker_config is not None:
            atomic_write(os.path.join(directory, "config.json"), json.dumps(spec.docker_config).encode(), mode=0o600)
        record = Record(spec.volume_id, spec.target, spec.attributes, pid, pid_started)
        atomic_write(os.path.join(directory, "volume.json"), json.dumps(asdict(record), indent=2).encode(), mode=0o600)
        return directory

    def load(self, target: str) -> Record | None:
        return self._read(self.directory(target))

    def all(self) -> list[Record]:
        """Every record; one that cannot be read is logged and passed over, not a reason to
        stop looking after the others."""
        found = []
        for name in sorted(os.listdir(self.root)):
            try:
                record = self._read(os.path.join(self.root, name))
            except ModelfsError as exc:
                log.error("%s", exc)
                continue
            if record is not None:
                found.append(record)
        return found

    def spec(self, record: Record) -> VolumeSpec:
        """The volume a record stands for, credentials included, to mount it again."""
        reference, parsed = parse_attributes(record.attributes)
        config_path = os.path.join(self.directory(record.target), "config.json")
        docker_config: dict[str, Any] | None = None
        if os.path.exists(config_path):
            with open(config_path) as handle:
                docker_config = json.load(handle)
        return VolumeSpec(record.volume_id, record.target, reference, record.attributes, parsed, docker_config)

    def remove(self, target: str) -> None:
        shutil.rmtree(self.directory(target), ignore_errors=True)

    def _read(self, directory: str) -> Record | None:
        try:
            with open(os.path.join(directory, "volume.json")) as handle:
                return Record(**json.load(handle))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            raise ModelfsError(f"unreadable volume record in {directory}: {exc}") from None
