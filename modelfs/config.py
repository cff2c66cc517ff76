"""Configuration: ``/etc/modelfs/config.toml``, then ``$XDG_CONFIG_HOME/modelfs/config.toml``
(later files override earlier ones key by key), then command-line flags.

    cache_dir = "/var/cache/modelfs"
    cache_max_size = "200G"          # LRU eviction above this; "" or 0 = unlimited
    prefetch = "all"                 # or "none"
    timeout = 120                    # seconds a read may wait before EIO
    stall_timeout = 30               # seconds a transfer may send nothing before it is retried
    workers = 0                      # threads receiving, checking, storing blocks; 0 = one per core
    verify = "full"                  # or "lazy": see doc/INTEGRITY.md

    [registries."registry.example.com"]
    plain_http = false
    ca_file = "/etc/ssl/private-ca.pem"
    mirrors = ["mirror.local:5000", "http://127.0.0.1:65001"]   # tried in order, then upstream
    verify = "lazy"                  # for this registry only

    [trust."registry.example.com/org"]   # signature policy for org/* (the longest scope wins)
    signatures = "enforce"
    key = ["/etc/modelfs/keys/release.pub"]

Which keys exist, and what each takes, comes from the one table of settings
(:mod:`modelfs.settings`), as the flags and fstab options do. Unknown keys are an error
naming the key and the file: a typo must not silently change behaviour on a fleet.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from .settings import (
    BY_NAME,
    REGISTRY_KEYS,
    TOP_LEVEL_KEYS,
    TRUST_KEYS,
    VERIFY_MODES,
    ConfigError,
    parse_mode,
    parse_size,
    parse_workers,
)

__all__ = ["VERIFY_MODES", "Config", "ConfigError", "Mirror", "RegistryConfig", "load", "parse_mode", "parse_size",
           "parse_workers"]

SYSTEM_CONFIG = "/etc/modelfs/config.toml"


@dataclass(frozen=True)
class Mirror:
    host: str
    plain_http: bool


@dataclass
class RegistryConfig:
    """What ``[registries."host"]`` says: settings that may differ per registry, and mirrors."""

    values: dict[str, Any] = field(default_factory=dict)
    mirrors: list[Mirror] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        if name in REGISTRY_KEYS - {"mirrors"}:
            value = self.values.get(name)
            return value if value is not None or BY_NAME[name].switch is False else False
        raise AttributeError(name)


@dataclass
class Config:
    """The config files' top-level settings (each parsed by its declaration in
    :mod:`modelfs.settings`), the per-registry tables, and which files were read."""

    values: dict[str, Any] = field(default_factory=dict)
    registries: dict[str, RegistryConfig] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    trust: dict[str, dict[str, Any]] = field(default_factory=dict)  # scope -> signature settings

    def registry(self, host: str) -> RegistryConfig:
        return self.registries.get(host, RegistryConfig())

    def trust_scope(self, registry: str, repository: str | None = None) -> str | None:
        """The longest ``[trust."..."]`` scope that contains ``registry/repository`` (cut at a
        ``/``: ``reg/org/llama`` does not contain ``reg/org/llama-2``), or None."""
        full = f"{registry}/{repository}" if repository else registry
        matching = [scope for scope in self.trust if full == scope or full.startswith(scope + "/")]
        return max(matching, key=len, default=None)

    def __getattr__(self, name: str) -> Any:
        if name in TOP_LEVEL_KEYS:
            value = self.values.get(name)
            return BY_NAME[name].default if value is None else value
        raise AttributeError(name)


def user_config_path() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return os.path.join(base, "modelfs", "config.toml")


def _mirror(text: Any, where: str) -> Mirror:
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{where}: mirrors must be a list of host[:port] strings")
    if text.startswith("http://"):
        return Mirror(text.removeprefix("http://").rstrip("/"), True)
    return Mirror(text.removeprefix("https://").rstrip("/"), False)


def _apply(config: Config, doc: dict[str, Any], path: str) -> None:
    for key, value in doc.items():
        if key == "registries":
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: registries must be a table of registry hosts")
            for host, settings in value.items():
                _apply_registry(config.registries.setdefault(host, RegistryConfig()), settings,
                                f"{path}: registries.{host!r}")
            continue
        if key == "trust":
            _apply_trust(config, value, path)
            continue
        if key not in TOP_LEVEL_KEYS:
            known = ", ".join(sorted(TOP_LEVEL_KEYS | {"registries", "trust"}))
            raise ConfigError(f"{path}: unknown key {key!r} (known: {known})")
        config.values[key] = BY_NAME[key].parse(value, f"{path}: {key}")


def _apply_registry(registry: RegistryConfig, settings: Any, where: str) -> None:
    if not isinstance(settings, dict):
        raise ConfigError(f"{where} must be a table")
    for key, value in settings.items():
        if key not in REGISTRY_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(REGISTRY_KEYS))})")
        if key == "mirrors":
            if not isinstance(value, list):
                raise ConfigError(f"{where}.mirrors must be a list")
            registry.mirrors = [_mirror(item, f"{where}.mirrors") for item in value]
        else:
            registry.values[key] = BY_NAME[key].parse(value, f"{where}.{key}")


def _apply_trust(config: Config, value: Any, path: str) -> None:
    """``[trust."registry/repository"]`` tables: a signature policy per registry or repository prefix."""
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(f"{path}: trust must be a table of \"registry[/repository]\" tables")
    for scope, settings in value.items():
        where = f"{path}: trust.{scope!r}"
        if not scope or "://" in scope or scope != scope.strip("/"):
            raise ConfigError(f"{where}: a scope is a registry host, optionally with a repository path (no scheme, "
                              "no slash at either end)")
        table = config.trust.setdefault(scope, {})
        for key, item in settings.items():
            if key not in TRUST_KEYS:
                raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(TRUST_KEYS))})")
            table[key] = BY_NAME[key].parse(item, f"{where}.{key}")


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
