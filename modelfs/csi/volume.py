"""What a pod asks for: a NodePublishVolume request turned into a checked :class:`VolumeSpec`.

The pod's ``volumeAttributes`` carry ``reference`` and the mount settings that make sense per
volume, under their fstab option names (one table: :mod:`modelfs.settings`). Settings that
belong to the node (cache, workers, TLS roots, mirrors, how strictly bytes are checked) are
the plugin's flags and ``/etc/modelfs/config.toml``, never a pod's to change. Credentials come
from ``nodePublishSecretRef``: a ``kubernetes.io/dockerconfigjson`` secret as it is, a legacy
``kubernetes.io/dockercfg`` one, or an opaque secret with ``username`` and ``password``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import settings
from ..errors import InvalidReferenceError, ModelfsError
from ..formats.gitignore import trim
from ..reference import parse

# The volumeAttributes a pod may give besides ``reference``.
# ``include`` and ``exclude`` narrow the view of the model (a pod sees less, never more than
# the model): gitignore patterns, one per line (or separated by commas).
PER_VOLUME_SETTINGS = ("prefetch", "timeout", "plain_http", "uid", "gid", "file_mode", "dir_mode", "include", "exclude")
LIST_SETTINGS = ("include", "exclude")
_UNESCAPED_COMMA = re.compile(r"(?<!\\),")
# Keys kubelet adds itself (podInfoOnMount, ephemeral): accepted and not part of the volume.
KUBELET_PREFIX = "csi.storage.k8s.io/"
FS_TYPES = ("", "modelfs", "fuse.modelfs")


class InvalidVolume(ModelfsError):
    """The pod's volume cannot be served as asked; the message says what to change."""


@dataclass(frozen=True)
class VolumeSpec:
    volume_id: str
    target: str
    reference: str
    attributes: dict[str, str]  # as the pod gave them, kubelet's own keys left out
    settings: dict[str, Any]  # parsed, by setting name
    docker_config: dict[str, Any] | None = field(default=None, repr=False)  # secret: never logged

    @property
    def registry(self) -> str:
        return parse(self.reference).registry

    def same_volume(self, volume_id: str, attributes: Mapping[str, str]) -> bool:
        """Whether a repeated publish asks for this very volume (kubelet retries are normal)."""
        return volume_id == self.volume_id and dict(attributes) == self.attributes

    def mount_flags(self) -> list[str]:
        """The ``modelfs mount`` flags for this volume's own settings."""
        flags: list[str] = []
        for name, value in self.settings.items():
            setting = settings.BY_NAME[name]
            if setting.switch:
                flags += [setting.flag] if value else []
            elif name in LIST_SETTINGS:
                flags += [f"{setting.flag}={item}" for item in value]  # a pattern may start with '-'
            elif name in ("file_mode", "dir_mode"):
                flags += [setting.flag, f"{value:o}"]
            else:
                flags += [setting.flag, str(value)]
        return flags


def pod_attributes(volume_context: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in volume_context.items() if not k.startswith(KUBELET_PREFIX)}


def parse_attributes(attributes: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """The reference and the parsed settings of a volume's attributes."""
    known = ("reference", *PER_VOLUME_SETTINGS)
    unknown = sorted(set(attributes) - set(known))
    if unknown:
        raise InvalidVolume(f"volumeAttributes: unknown key {unknown[0]!r}; modelfs volumes take {', '.join(known)}")
    if not attributes.get("reference", "").strip():
        raise InvalidVolume("volumeAttributes: 'reference' is required: the model to mount, like "
                            "registry.example.com/org/llama:8b")
    try:
        reference = str(parse(attributes["reference"].strip()))
    except InvalidReferenceError as exc:
        raise InvalidVolume(f"volumeAttributes.reference: {exc}") from None
    parsed = {name: _parse_setting(name, attributes[name]) for name in PER_VOLUME_SETTINGS if name in attributes}
    return reference, parsed


def _parse_setting(name: str, text: str) -> Any:
    where = f"volumeAttributes.{name}"
    setting = settings.BY_NAME[name]
    try:
        if setting.switch:
            if text.strip().lower() not in ("true", "false"):
                raise settings.ConfigError(f"{where} must be \"true\" or \"false\", not {text!r}")
            return text.strip().lower() == "true"
        if name in LIST_SETTINGS:
            # '\,' is a comma of the pattern (gitignore reads it as ','); each item as given, its
            # own rules trim it (an escaped trailing space 'a\ ' stays)
            items = [trim(item) for line in text.splitlines() for item in _UNESCAPED_COMMA.split(line) if item.strip()]
            return setting.parse(items or [text], where)
        if name in ("uid", "gid") and not text.strip().isdigit():
            raise settings.ConfigError(f"{where} must be a number: {text!r} is a name, and names of the node's users "
                                       "mean nothing to a pod")
        return setting.parse(text, where)
    except settings.ConfigError as exc:
        raise InvalidVolume(str(exc)) from None


def docker_config(secrets: Mapping[str, str], registry: str) -> dict[str, Any] | None:
    """A Docker ``config.json`` with the credentials of ``nodePublishSecretRef`` (None if none).

    Credential helpers are refused: a pod's secret must not make the node run a program.
    Messages name the secret's keys, never a value.
    """
    if not secrets:
        return None
    if ".dockerconfigjson" in secrets:
        doc = _json_object(secrets[".dockerconfigjson"], ".dockerconfigjson")
        if doc.get("credHelpers") or doc.get("credsStore"):
            raise InvalidVolume("nodePublishSecretRef: credential helpers (credHelpers, credsStore) do not run on the "
                                "node; put the registry's credentials in the secret's auths")
        if not isinstance(doc.get("auths"), dict):
            raise InvalidVolume("nodePublishSecretRef: .dockerconfigjson has no \"auths\" object (make the secret with "
                                "kubectl create secret docker-registry)")
        return {"auths": doc["auths"]}
    if ".dockercfg" in secrets:
        return {"auths": _json_object(secrets[".dockercfg"], ".dockercfg")}
    if "username" in secrets and "password" in secrets:
        return {"auths": {registry: {"username": secrets["username"], "password": secrets["password"]}}}
    raise InvalidVolume(f"nodePublishSecretRef: a secret with keys {', '.join(sorted(secrets))} holds no registry "
                        "credentials; give a kubernetes.io/dockerconfigjson secret, or username and password")


def _json_object(text: str, key: str) -> dict[str, Any]:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise InvalidVolume(f"nodePublishSecretRef: {key} is not JSON ({exc.args[0].split(':')[0]})") from None
    if not isinstance(doc, dict):
        raise InvalidVolume(f"nodePublishSecretRef: {key} is not a JSON object")
    return doc


def parse_publish(request: Any) -> VolumeSpec:
    """Check a NodePublishVolumeRequest; InvalidVolume says what the pod must change."""
    if not request.volume_id:
        raise InvalidVolume("volume_id is missing")
    if not request.target_path.startswith("/"):
        raise InvalidVolume(f"target_path must be an absolute path, not {request.target_path!r}")
    capability = request.volume_capability
    if not capability.HasField("mount"):
        raise InvalidVolume("a modelfs volume is a filesystem, not a block device (use it as a volume, not a "
                            "volumeDevice)")
    if capability.mount.fs_type not in FS_TYPES:
        raise InvalidVolume(f"fsType {capability.mount.fs_type!r} is not modelfs's: leave it out")
    flags = [flag for flag in capability.mount.mount_flags if flag != "ro"]
    if flags:
        raise InvalidVolume(f"mount option {flags[0]!r} is not supported: give settings as volumeAttributes "
                            f"({', '.join(PER_VOLUME_SETTINGS)})")
    attributes = pod_attributes(request.volume_context)
    reference, parsed = parse_attributes(attributes)
    return VolumeSpec(request.volume_id, request.target_path, reference, attributes, parsed,
                      docker_config(request.secrets, parse(reference).registry))
