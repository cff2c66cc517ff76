"""Registry credentials: ``modelfs login`` storage and Docker's ``config.json``.

Lookup order for a registry host: modelfs's own file (written by ``modelfs login``, mode
0600), then Docker's config (``credHelpers`` -> ``auths`` -> ``credsStore``), so a host that
already ``docker login``-ed needs nothing more. Secrets never appear in ``repr`` or logs.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field

import trio

from .atomic import atomic_write
from .errors import AuthenticationError, ModelfsError
from .reference import DOCKER_HUB

_DOCKER_HUB_KEY = "https://index.docker.io/v1/"


@dataclass(frozen=True)
class Credential:
    username: str
    password: str = field(repr=False)

    @property
    def basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def default_auth_file() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return os.path.join(base, "modelfs", "auth.json")


def docker_config_file() -> str:
    base = os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker")
    return os.path.join(base, "config.json")


def _host_keys(registry: str) -> list[str]:
    if registry == DOCKER_HUB:
        return [_DOCKER_HUB_KEY, DOCKER_HUB, "index.docker.io", "registry-1.docker.io"]
    return [registry, f"https://{registry}", f"http://{registry}"]


def _decode_auth(entry: dict, where: str) -> Credential | None:
    if entry.get("username") and entry.get("password"):
        return Credential(entry["username"], entry["password"])
    encoded = entry.get("auth")
    if not encoded:
        return None
    try:
        user, _, password = base64.b64decode(encoded).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        raise ModelfsError(f"{where}: malformed 'auth' entry (not base64 of user:password)") from None
    return Credential(user, password)


def _load(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            doc = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelfsError(f"cannot read credentials file {path}: {exc}") from None
    return doc if isinstance(doc, dict) else {}


async def _from_helper(helper: str, registry: str) -> Credential | None:
    program = f"docker-credential-{helper}"
    for key in _host_keys(registry):
        try:
            result = await trio.run_process([program, "get"], stdin=key.encode(), capture_stdout=True,
                                            capture_stderr=True, check=False)
        except FileNotFoundError:
            raise AuthenticationError(f"credential helper {program} named in {docker_config_file()} is not installed") from None
        if result.returncode == 0:
            try:
                doc = json.loads(result.stdout)
            except ValueError:
                raise AuthenticationError(f"credential helper {program} returned malformed output") from None
            return Credential(doc.get("Username", ""), doc.get("Secret", ""))
    return None


class CredentialStore:
    def __init__(self, auth_file: str | None = None, docker_config: str | None = None) -> None:
        self.auth_file = auth_file or default_auth_file()
        self.docker_config = docker_config or docker_config_file()

    def save(self, registry: str, credential: Credential) -> None:
        doc = _load(self.auth_file)
        auths = doc.setdefault("auths", {})
        token = base64.b64encode(f"{credential.username}:{credential.password}".encode()).decode()
        auths[registry] = {"auth": token}
        os.makedirs(os.path.dirname(self.auth_file), mode=0o700, exist_ok=True)
        atomic_write(self.auth_file, json.dumps(doc, indent=2).encode(), mode=0o600)

    def remove(self, registry: str) -> bool:
        doc = _load(self.auth_file)
        removed = doc.get("auths", {}).pop(registry, None) is not None
        if removed:
            atomic_write(self.auth_file, json.dumps(doc, indent=2).encode(), mode=0o600)
        return removed

    async def lookup(self, registry: str) -> Credential | None:
        own = _load(self.auth_file).get("auths", {})
        for key in _host_keys(registry):
            if key in own:
                return _decode_auth(own[key], self.auth_file)
        docker = _load(self.docker_config)
        helpers = docker.get("credHelpers") or {}
        for key in _host_keys(registry):
            if key in helpers:
                return await _from_helper(helpers[key], registry)
        auths = docker.get("auths") or {}
        for key in _host_keys(registry):
            if key in auths:
                found = _decode_auth(auths[key], self.docker_config)
                if found:
                    return found
        if docker.get("credsStore"):
            return await _from_helper(docker["credsStore"], registry)
        return None
