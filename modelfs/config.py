"""Configuration: ``/etc/modelfs/config.toml``, then ``$XDG_CONFIG_HOME/modelfs/config.toml``
(later files override earlier ones key by key), then command-line flags.

    cache_dir = "/var/cache/modelfs"
    cache_max_size = "200G"          # LRU eviction above this; "" or 0 = unlimited
    prefetch = "all"                 # or "none"
    timeout = 120                    # seconds a read may wait before EIO
    workers = 0                      # threads receiving, checking, storing blocks; 0 = one per core
    verify = "full"                  # or "lazy": see the README, "Integrity"

    [registries."registry.example.com"]
    plain_http = false
    ca_file = "/etc/ssl/private-ca.pem"
    mirrors = ["mirror.local:5000", "http://127.0.0.1:65001"]   # tried in order, then upstream
    verify = "lazy"                  # for this registry only

Unknown keys are an error naming the key and the file: a typo must not silently change
behaviour on a fleet.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelfsError

SYSTEM_CONFIG = "/etc/modelfs/config.toml"
_TOP_KEYS = {"cache_dir", "cache_max_size", "prefetch", "timeout", "verify", "workers", "registries"}
_REGISTRY_KEYS = {"plain_http", "ca_file", "mirrors", "verify"}
VERIFY_MODES = ("full", "lazy")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?", re.IGNORECASE)


class ConfigError(ModelfsError):
    pass


MAX_WORKERS = 256


def parse_owner(value: Any, kind: str, where: str) -> int:
    """A uid or gid: a number, or a user or group name of this host."""
    import grp
    import pwd
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid if kind == "user" else grp.getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(f"{where}: no {kind} {text!r} on this host (give a name that exists, or a number)") from None


def parse_mode(value: Any, where: str) -> int:
    """Permission bits in octal (0444, 444 or 0o444); read-only mounts ignore write bits."""
    text = str(value).strip().lower().removeprefix("0o")
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"{where}: {value!r} is not a permission mode (octal, like 0444 or 0555)")
    return mode


def parse_workers(value: Any, where: str) -> int:
    """A worker count: 0 (one per core available) up to MAX_WORKERS."""
    try:
        count = int(value) if not isinstance(value, bool) else -1
    except (TypeError, ValueError):
        count = -1
    if count < 0 or count > MAX_WORKERS or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{where} must be a whole number from 0 (one per core) to {MAX_WORKERS}, not {value!r}")
    return count


@dataclass(frozen=True)
class Mirror:
    host: str
    plain_http: bool


@dataclass
class RegistryConfig:
    plain_http: bool = False
    ca_file: str | None = None
    mirrors: list[Mirror] = field(default_factory=list)
    verify: str | None = None  # None: the top-level setting


@dataclass
class Config:
    cache_dir: str | None = None
    cache_max_size: int = 0
    prefetch: str = "all"
    timeout: float = 120.0
    workers: int = 0
    verify: str = "full"
    registries: dict[str, RegistryConfig] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def registry(self, host: str) -> RegistryConfig:
        return self.registries.get(host, RegistryConfig())


def parse_size(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        if not value.strip():
            return 0
        match = _SIZE.fullmatch(value.strip())
        if match:
            scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2).upper()]
            return int(float(match.group(1)) * scale)
    raise ConfigError(f"{where}: {value!r} is not a size (like 500M, 200G or a byte count)")


def user_config_path() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return os.path.join(base, "modelfs", "config.toml")


def _mirror(text: Any, where: str) -> Mirror:
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{where}: mirrors must be a list of host[:port] strings")
    if text.startswith("http://"):
        return Mirror(text.removeprefix("http://").rstrip("/"), True)
    return Mirror(text.removeprefix("https://").rstrip("/"), False)


def _verify(value: Any, where: str) -> str:
    if value not in VERIFY_MODES:
        raise ConfigError(f"{where} must be {' or '.join(repr(m) for m in VERIFY_MODES)}")
    return value


def _apply(config: Config, doc: dict[str, Any], path: str) -> None:
    for key, value in doc.items():
        where = f"{path}: {key}"
        if key not in _TOP_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(sorted(_TOP_KEYS))})")
        if key == "cache_dir":
            if not isinstance(value, str):
                raise ConfigError(f"{where} must be a string")
            config.cache_dir = value
        elif key == "cache_max_size":
            config.cache_max_size = parse_size(value, where)
        elif key == "prefetch":
            if value not in ("all", "none"):
                raise ConfigError(f"{where} must be 'all' or 'none'")
            config.prefetch = value
        elif key == "timeout":
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{where} must be a positive number of seconds")
            config.timeout = float(value)
        elif key == "verify":
            config.verify = _verify(value, where)
        elif key == "workers":
            config.workers = parse_workers(value, where)
        elif key == "registries":
            if not isinstance(value, dict):
                raise ConfigError(f"{where} must be a table of registry hosts")
            for host, settings in value.items():
                _apply_registry(config.registries.setdefault(host, RegistryConfig()), settings, f"{path}: registries.{host!r}")


def _apply_registry(registry: RegistryConfig, settings: Any, where: str) -> None:
    if not isinstance(settings, dict):
        raise ConfigError(f"{where} must be a table")
    for key, value in settings.items():
        if key not in _REGISTRY_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(_REGISTRY_KEYS))})")
        if key == "plain_http":
            if not isinstance(value, bool):
                raise ConfigError(f"{where}.plain_http must be true or false")
            registry.plain_http = value
        elif key == "ca_file":
            registry.ca_file = str(value)
        elif key == "verify":
            registry.verify = _verify(value, f"{where}.verify")
        elif key == "mirrors":
            if not isinstance(value, list):
                raise ConfigError(f"{where}.mirrors must be a list")
            registry.mirrors = [_mirror(item, f"{where}.mirrors") for item in value]


def load(paths: list[str] | None = None) -> Config:
    config = Config()
    explicit = os.environ.get("MODELFS_CONFIG")
    for path in paths if paths is not None else ([explicit] if explicit else [SYSTEM_CONFIG, user_config_path()]):
        try:
            with open(path, "rb") as handle:
                doc = tomllib.load(handle)
        except FileNotFoundError:
            if explicit:
                raise ConfigError(f"config file {path} (MODELFS_CONFIG) does not exist") from None
            continue
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        _apply(config, doc, path)
        config.sources.append(path)
    return config
