"""Every mount setting, declared once: its type (the parser that validates it), default, help,
and its name on each surface. The ``mount`` flags, the fstab ``-o`` options and the
config.toml keys are all generated from this table, so they cannot drift apart: a value the
config file refuses is refused on the command line too, with the same words.

Precedence: a flag (or fstab option), then the config's ``[registries."host"]`` table for the
settings that may differ per registry, then the config's top level, then the default.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InvalidPattern, ModelfsError

VERIFY_MODES = ("full", "lazy")
VIEW_COMMANDS = ("pull", "extract")  # besides mount: they take --include and --exclude too
SIGNATURE_MODES = ("enforce", "warn", "off")
SIGNED_COMMANDS = ("verify", "pull", "extract", "inspect")  # besides mount: they take the signature settings too
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_WORKERS = 256
MAX_ID = 4294967294  # uid_t and gid_t are 32 bits, and 4294967295 is (uid_t) -1: "no id" to chown(2)
MAX_SIZE = (1 << 63) - 1  # off_t: no file, and no cache, is larger
# ASCII digits only, written out: `\d`, str.isdigit() and int() also take '²', '١٢' or '1_000'
_NUMBER = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?B?)?", re.IGNORECASE)
_OCTAL = re.compile(r"(?:0o)?([0-7]+)", re.IGNORECASE)


class ConfigError(ModelfsError):
    pass


# -- parsers: (value from a flag, an fstab option or the config file, where it came from) -----
# A flag and an fstab option give text; the config file gives TOML's own types. Every number
# in text is ASCII digits in the setting's range, decided here once for every surface.


def whole_number(value: Any, low: int, high: int) -> int | None:
    """``value`` as a whole number from ``low`` to ``high``, or None: a TOML integer (or a
    float with nothing after the point), or text of ASCII digits."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        number = int(value) if value.is_integer() else None  # inf and nan are not integers
    elif isinstance(value, int):
        number = value
    elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        number = int(value.strip())
    else:
        number = None
    return number if number is not None and low <= number <= high else None


def parse_count(value: Any, where: str, low: int, high: int) -> int:
    number = whole_number(value, low, high)
    if number is None:
        raise ConfigError(f"{where} must be a whole number from {low} to {high}, not {str(value)!r}")
    return number


def parse_size(value: Any, where: str) -> int:
    size: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value if value >= 0 else None
    elif isinstance(value, str):
        if not value.strip():
            return 0
        match = _SIZE.fullmatch(value.strip())
        if match:
            scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2).upper()]
            size = int(float(match.group(1)) * scale)
    if size is not None and size > MAX_SIZE:
        raise ConfigError(f"{where}: {str(value)!r} is more than the largest size a file can have (8E)")
    if size is None:
        raise ConfigError(f"{where}: {str(value)!r} is not a size (like 500M, 200G or a byte count)")
    return size


def parse_seconds(value: Any, where: str) -> float:
    seconds = -1.0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        seconds = float(value.strip())
    if not 0 < seconds <= 86400:  # nan and inf fail this too
        raise ConfigError(f"{where}: {str(value)!r} is not a number of seconds from more than 0 to 86400 (with 0 every "
                          "cold read would fail at once)")
    return seconds


def parse_workers(value: Any, where: str) -> int:
    """A worker count: 0 (one per core available) up to MAX_WORKERS."""
    count = whole_number(value, 0, MAX_WORKERS)
    if count is None:
        raise ConfigError(f"{where} must be a whole number from 0 (one per core) to {MAX_WORKERS}, not {str(value)!r}")
    return count


def parse_owner_user(value: Any, where: str) -> int:
    return _owner(value, "user", where)


def parse_owner_group(value: Any, where: str) -> int:
    return _owner(value, "group", where)


def _owner(value: Any, kind: str, where: str) -> int:
    """A uid or gid: a number from 0 to MAX_ID, or a user or group name of this host. Text
    that looks like a number to Python (``str.isdigit``: '²', '١٢') is a number, and must be
    ASCII digits in range, never a name to look up."""
    import grp
    import pwd
    text = str(value).strip()
    if not isinstance(value, str) or text.isdigit():
        number = whole_number(value if not isinstance(value, str) else text, 0, MAX_ID)
        if number is None:
            raise ConfigError(f"{where}: {text!r} is not a {kind} id: a number of ASCII digits from 0 to {MAX_ID}")
        return number
    try:
        return pwd.getpwnam(text).pw_uid if kind == "user" else grp.getgrnam(text).gr_gid
    except (KeyError, ValueError):  # ValueError: a NUL or an unpaired surrogate, which no name holds
        raise ConfigError(f"{where}: no {kind} {text!r} on this host (give a name that exists, or a number)") from None


def parse_mode(value: Any, where: str) -> int:
    """Permission bits in octal (0444, 444 or 0o444); read-only mounts ignore write bits. The
    config file gives them as a string: a TOML number cannot say whether 444 is octal, and
    taking TOML's 0o555 (365) as the octal digits 365 served 0o365."""
    if isinstance(value, int) and not isinstance(value, bool):
        raise ConfigError(f"{where}: write the mode as a string of octal digits, like \"0444\" (a TOML number, "
                          f"{value}, cannot say whether it is octal)")
    match = _OCTAL.fullmatch(value.strip()) if isinstance(value, str) else None
    mode = int(match.group(1), 8) if match else -1
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"{where}: {str(value)!r} is not a permission mode (octal, like 0444 or 0555)")
    return mode


def parse_address(value: Any, where: str) -> str:
    """HOST:PORT to listen on, the port from 1 to 65535 ([::1]:9410 for IPv6)."""
    host, _, port = str(value).rpartition(":")
    if not host or whole_number(port, 1, 65535) is None or port != port.strip():
        raise ConfigError(f"{where}: {str(value)!r} is not HOST:PORT with a port from 1 to 65535 (like 127.0.0.1:9410)")
    return str(value)


def parse_path(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a path")
    return value


def parse_paths(value: Any, where: str) -> list[str]:
    """One path, or a list of them (a repeated flag or fstab option gives one at a time)."""
    items = value if isinstance(value, list) else [value]
    return [parse_path(item, where) for item in items]


def parse_texts(value: Any, where: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(item, str) and item.strip() for item in items):
        raise ConfigError(f"{where} must be a non-empty string or a list of them")
    return [item.strip() for item in items]


def parse_patterns(value: Any, where: str) -> list[str]:
    """View patterns (gitignore lines, :mod:`modelfs.formats.view`): one from a flag or an fstab
    option (repeated for more), a list in the config file; each refused in one line if it is no
    pattern or matches nothing."""
    from .formats.view import check_patterns  # formats/ only when a view is given: settings stays a leaf
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str) for item in items):
        raise ConfigError(f"{where} must be a pattern or a list of them")
    try:
        check_patterns(items, where)
    except InvalidPattern as exc:
        raise ConfigError(str(exc)) from None
    return list(items)  # as given: the pattern's own rules trim it (an escaped trailing space stays)


def parse_text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a non-empty string")
    return value.strip()


def parse_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{where} must be true or false")


def choice(*allowed: str) -> Callable[[Any, str], str]:
    def parse(value: Any, where: str) -> str:
        if value not in allowed:
            raise ConfigError(f"{where} must be {' or '.join(repr(a) for a in allowed)}, not {str(value)!r}")
        return str(value)
    return parse


# -- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    name: str  # the ResolvedSettings field and the config key
    parse: Callable[[Any, str], Any]
    default: Any
    help: str
    metavar: str = "VALUE"
    switch: bool = False  # a flag without a value (``--allow-other``, ``-o allow_other``)
    option: str | None = None  # the fstab option when it is not ``name``
    common: bool = False  # a flag of every command, not only of ``mount``
    top_level: bool = True  # a config.toml key at the top level
    per_registry: bool = False  # also a key of ``[registries."host"]``, which wins for that host
    repeat: bool = False  # a flag (and fstab option) that may be given more than once
    commands: tuple[str, ...] = ()  # other commands that take this (non-common) flag besides mount
    trust_scope: bool = False  # also a key of ``[trust."registry/repository"]`` (modelfs/signing/policy.py)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def fstab(self) -> str:
        return self.option or self.name


SETTINGS: tuple[Setting, ...] = (
    Setting("cache_dir", parse_path, None, "block cache (default: /var/cache/modelfs as root, else ~/.cache/modelfs)",
            "DIR", common=True),
    Setting("plain_http", parse_bool, False, "talk HTTP, not HTTPS, to the registry", switch=True, common=True,
            top_level=False, per_registry=True),
    Setting("ca_file", parse_path, None, "PEM bundle to verify the registry's TLS certificate", "FILE", common=True,
            top_level=False, per_registry=True),
    Setting("log_level", choice(*LOG_LEVELS), None, "debug, info, warning or error (default: warning; a daemon: info)",
            "LEVEL", common=True),
    Setting("prefetch", choice("all", "none"), "all", "fetch the whole model in the background: all or none", "WHAT"),
    Setting("timeout", parse_seconds, 120.0, "seconds a read may wait before it fails with EIO", "SECONDS"),
    Setting("stall_timeout", parse_seconds, None, "seconds a transfer may deliver nothing before it is aborted and "
            "retried (default: the timeout; shorter, a stalled server costs a retry, not a failed read)", "SECONDS"),
    Setting("workers", parse_workers, 0, "threads that receive, check and store blocks (0: one per core available)",
            "N"),
    Setting("verify", choice(*VERIFY_MODES), "full",
            "full: serve no byte before it is checked; lazy: serve bytes of blobs without a trusted block index "
            "before their blob is checked whole", "MODE", per_registry=True),
    Setting("cache_max_size", parse_size, 0, "evict least recently used blobs above this size (like 200G; 0: no limit)",
            "SIZE"),
    Setting("metrics", parse_address, None, "serve Prometheus metrics here (like 127.0.0.1:9410)", "HOST:PORT"),
    Setting("allow_other", parse_bool, False, "let other users read the mount (files then 0444, 0555 if executable)",
            switch=True),
    Setting("allow_nonempty", parse_bool, False, "mount over a directory that has files (hidden while mounted)",
            switch=True, option="nonempty"),
    Setting("uid", parse_owner_user, None, "owner of every file and directory, a name or a number (default: who mounts)",
            "USER"),
    Setting("gid", parse_owner_group, None, "group of every file and directory (default: who mounts)", "GROUP"),
    Setting("file_mode", parse_mode, None, "permissions of every file, octal (exec added where the artifact has it)",
            "MODE"),
    Setting("dir_mode", parse_mode, None, "permissions of every directory, octal (default 0555)", "MODE"),
    Setting("log_max_size", parse_size, 10 << 20, "rotate the background daemon's log at this size, keeping 2 old ones",
            "SIZE"),
    Setting("include", parse_patterns, None, "only the files this gitignore pattern matches (repeatable; '!' takes a "
            "match back, the last match wins); see Selective views", "PATTERN", repeat=True, commands=VIEW_COMMANDS),
    Setting("exclude", parse_patterns, None, "leave out the files this gitignore pattern matches, after --include "
            "(repeatable; '!' keeps a match in)", "PATTERN", repeat=True, commands=VIEW_COMMANDS),
    Setting("signatures", choice(*SIGNATURE_MODES), None,
            "enforce: serve nothing unless a signature by a listed key or identity covers the model; warn: serve and "
            "say so (default: enforce when a key or identity is given, else off)", "MODE", commands=SIGNED_COMMANDS,
            trust_scope=True),
    Setting("key", parse_paths, None, "public key (PEM) that must have signed the model; repeatable, any one will do",
            "PUBLIC.pem", repeat=True, commands=SIGNED_COMMANDS, trust_scope=True),
    Setting("certificate_identity", parse_texts, None, "keyless signer that will do (certificate e-mail or CI workflow "
            "URI); repeatable", "IDENTITY", repeat=True, commands=SIGNED_COMMANDS, trust_scope=True),
    Setting("certificate_oidc_issuer", parse_text, None, "OIDC issuer that vouched for those identities", "URL",
            commands=SIGNED_COMMANDS, trust_scope=True),
    Setting("trusted_root", parse_path, None, "Sigstore trusted root (JSON) to check keyless signatures against, offline",
            "FILE", commands=SIGNED_COMMANDS, trust_scope=True),
)

BY_NAME = {setting.name: setting for setting in SETTINGS}
BY_OPTION = {setting.fstab: setting for setting in SETTINGS}
TOP_LEVEL_KEYS = {setting.name for setting in SETTINGS if setting.top_level}
REGISTRY_KEYS = {setting.name for setting in SETTINGS if setting.per_registry} | {"mirrors"}
TRUST_KEYS = {setting.name for setting in SETTINGS if setting.trust_scope}


def add_flags(parser: Any, common: bool, command: str | None = None) -> None:
    """The flags of the settings of one kind (common to every command, or the mount's own;
    with ``command``, those of the mount's that this command takes too). Their default is
    None: the config file and the table's default are applied later."""
    for setting in SETTINGS:
        if setting.common != common or (command is not None and command not in setting.commands):
            continue
        if setting.switch:
            parser.add_argument(setting.flag, action="store_true", default=None, help=setting.help)
        elif setting.repeat:
            parser.add_argument(setting.flag, metavar=setting.metavar, help=setting.help, action="extend",
                                type=_flag_parser(setting))
        else:
            parser.add_argument(setting.flag, metavar=setting.metavar, help=setting.help,
                                type=_flag_parser(setting))


def _flag_parser(setting: Setting) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        return setting.parse(value, setting.flag)
    return parse


def fstab_flags(option: str) -> list[str]:
    """The ``mount`` flags for one fstab ``-o`` option (``name`` or ``name=value``)."""
    key, has_value, value = option.partition("=")
    setting = BY_OPTION.get(key)
    if setting is None or setting.switch == bool(has_value):
        raise ConfigError(f"unknown mount option {option!r}")
    if has_value:
        setting.parse(value, f"-o {key}")  # a mistake named as the fstab line has it, not as the flag
    # one argument, '--flag=value': a value may start with '-' (an --exclude pattern '-draft.bin')
    return [setting.flag] if setting.switch else [f"{setting.flag}={value}"]


def resolve(name: str, given: Any, config: Any, host: str | None = None, scope: str | None = None) -> Any:
    """A setting's value: the flag if given, else the config for ``host`` (its
    ``[registries."host"]`` table, or for a signature setting the ``[trust."..."]`` table
    ``scope`` names), else its top level, else the default."""
    setting = BY_NAME[name]
    if given is not None and given is not False and given != []:
        return given
    if host is not None and setting.per_registry:
        value = config.registry(host).values.get(name)
        if value is not None:
            return value
    if scope is not None and setting.trust_scope:
        value = config.trust.get(scope, {}).get(name)
        if value is not None:
            return value
    if setting.top_level and config.values.get(name) is not None:
        return config.values[name]
    return setting.default


def _shown(setting: Setting) -> str:
    default = setting.default
    if setting.switch:
        return "off"
    if default is None:
        return "-"
    if setting.parse is parse_size:
        return "0 (none)" if default == 0 else f"{default >> 20}M"
    return str(default)


def markdown_table() -> str:
    """The table of every setting: flag, fstab option, config key, default, help."""
    rows = ["| flag | fstab `-o` | config.toml | default | what it does |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        flag = s.flag if s.switch else f"{s.flag} {s.metavar}"
        fstab = s.fstab if s.switch else f"{s.fstab}=..."
        where = [w for w, on in (("top level", s.top_level), ('`[registries."host"]`', s.per_registry),
                                 ('`[trust."host/repo"]`', s.trust_scope)) if on]
        rows.append(f"| `{flag}` | `{fstab}` | {', '.join(where) or '-'} | {_shown(s)} | {s.help} |")
    return "\n".join(rows) + "\n"


def fstab_options() -> str:
    """Every fstab ``-o`` option, as a mount line takes it."""
    return ", ".join(f"`{s.fstab}`" if s.switch else f"`{s.fstab}=`" for s in SETTINGS) + "\n"


# The parts of doc/CONFIGURATION.md made from the declarations, each between
# ``<!-- generated: NAME ... -->`` and ``<!-- end: NAME -->``; tests/test_docs.py keeps the
# document equal to what :func:`fill` makes of it.
SECTIONS: dict[str, Callable[[], str]] = {"settings-table": markdown_table, "fstab-options": fstab_options}
_SECTION = re.compile(r"(<!-- generated: (?P<name>[\w-]+)[^\n]*-->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.DOTALL)


def fill(text: str) -> str:
    """``text`` with every generated section made again from the declarations."""
    return _SECTION.sub(lambda m: m.group(1) + SECTIONS[m.group("name")]() + m.group(4), text)


if __name__ == "__main__":  # python -m modelfs.settings [FILE]: rewrite FILE's generated sections, or print the table
    import sys

    if len(sys.argv) > 1:
        with open(sys.argv[1]) as handle:
            current = handle.read()
        with open(sys.argv[1], "w") as handle:
            handle.write(fill(current))
    else:
        print(markdown_table(), end="")
