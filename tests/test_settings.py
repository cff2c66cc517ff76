"""Every mount setting through every surface: the flag, the fstab option and the config key
give the mount the same value and refuse the same mistake with the same words (the tables of
doc/CONFIGURATION.md are kept equal to the declarations by tests/test_docs.py)."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from modelfs import cli, settings
from modelfs.commands.mount import mount_options
from modelfs.config import load
from modelfs.dirs import default_cache_dir
from modelfs.resolved import ResolvedSettings
from modelfs.settings import SETTINGS, ConfigError

REF = "registry.example/org/model:v1"
# a valid value (as text, as it comes from a flag or an fstab option), what the mount gets,
# and a mistake each surface must refuse
SAMPLES = {
    "cache_dir": ("/var/tmp/cache", "/var/tmp/cache", None),
    "plain_http": (True, True, None),
    "ca_file": ("/etc/ssl/ca.pem", "/etc/ssl/ca.pem", None),
    "log_level": ("debug", "debug", "loud"),
    "prefetch": ("none", "none", "some"),
    "timeout": ("7.5", 7.5, "0"),
    "stall_timeout": ("2.5", 2.5, "0"),
    "workers": ("3", 3, "-5"),
    "verify": ("lazy", "lazy", "never"),
    "cache_max_size": ("2G", 2 << 30, "10Q"),
    "metrics": ("127.0.0.1:9410", "127.0.0.1:9410", "127.0.0.1:99999"),
    "allow_other": (True, True, None),
    "allow_nonempty": (True, True, None),
    "uid": ("0", 0, "no-such-user-here"),
    "gid": ("0", 0, "no-such-group-here"),
    "file_mode": ("0440", 0o440, "0999"),
    "dir_mode": ("550", 0o550, "rwx"),
    "log_max_size": ("1M", 1 << 20, "big"),
    "include": ("*Q4_K_M*.gguf", ["*Q4_K_M*.gguf"], "#x"),
    "exclude": ("docs/", ["docs/"], "\\"),
    "signatures": ("warn", "warn", "sometimes"),
    "key": ("/etc/modelfs/release.pub", ["/etc/modelfs/release.pub"], None),
    "certificate_identity": ("ci@example.com", ["ci@example.com"], None),
    "certificate_oidc_issuer": ("https://issuer.example", "https://issuer.example", None),
    "trusted_root": ("/etc/modelfs/trusted_root.json", "/etc/modelfs/trusted_root.json", None),
}


@pytest.fixture(autouse=True)
def _no_cache_dir_from_the_environment(monkeypatch):
    monkeypatch.delenv("MODELFS_CACHE_DIR", raising=False)


def test_every_setting_has_a_sample_here():
    assert set(SAMPLES) == {s.name for s in SETTINGS}


def _config(tmp_path, text: str = ""):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load([str(path)])


def _value(args: argparse.Namespace, name: str, config) -> object:
    """What the mount gets for ``name``."""
    cli._resolve_settings(args, config)
    return getattr(mount_options(args).settings, name)


def test_the_resolved_settings_are_the_declared_ones():
    """One field per declared setting (and the registry with its mirrors, the repository with
    the signature policy's scope); none with a default of its own to drift from the table."""
    fields = ResolvedSettings.__dataclass_fields__
    assert set(fields) == {s.name for s in SETTINGS} | {"registry", "mirrors", "repository", "trust_scope"}
    assert not [name for name, f in fields.items() if f.default is not dataclasses.MISSING]


def _toml(setting, text) -> str:
    value = text if isinstance(text, bool) else (repr(text) if not str(text).replace(".", "").isdigit()
                                                   or setting.name in ("uid", "gid", "file_mode", "dir_mode") else text)
    if isinstance(value, str) and value.startswith("'"):
        value = '"' + value.strip("'") + '"'
    line = f"{setting.name} = {str(value).lower() if isinstance(text, bool) else value}\n"
    return line if setting.top_level else f'[registries."registry.example"]\n{line}'


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_flag_fstab_option_and_config_key_give_the_same_value(setting, tmp_path):
    text, expected, _ = SAMPLES[setting.name]
    flag = [setting.flag] if setting.switch else [setting.flag, str(text)]
    by_flag = cli._parser().parse_args(["mount", *flag, REF, "/mnt/x"])
    assert _value(by_flag, setting.name, _config(tmp_path)) == expected

    option = setting.fstab if setting.switch else f"{setting.fstab}={text}"
    by_fstab = cli._parser().parse_args(cli.mount_helper_argv([REF, "/mnt/x", "-o", f"ro,{option}"]))
    assert _value(by_fstab, setting.name, _config(tmp_path)) == expected

    by_config = cli._parser().parse_args(["mount", REF, "/mnt/x"])
    assert _value(by_config, setting.name, _config(tmp_path, _toml(setting, text))) == expected

    untouched = cli._parser().parse_args(["mount", REF, "/mnt/x"])
    default = _value(untouched, setting.name, _config(tmp_path))
    assert default == (setting.default if setting.name != "cache_dir" else default_cache_dir())


@pytest.mark.parametrize("setting", [s for s in SETTINGS if SAMPLES[s.name][2] is not None], ids=lambda s: s.name)
def test_each_surface_refuses_a_mistake_with_the_same_words(setting, tmp_path):
    bad = SAMPLES[setting.name][2]
    with pytest.raises(ConfigError) as by_flag:
        cli._parser().parse_args(["mount", setting.flag, bad, REF, "/mnt/x"])
    with pytest.raises(ConfigError) as by_fstab:
        cli._parser().parse_args(cli.mount_helper_argv([REF, "/mnt/x", "-o", f"{setting.fstab}={bad}"]))
    with pytest.raises(ConfigError) as by_config:
        _config(tmp_path, _toml(setting, bad))
    reason = str(by_flag.value).split(": ", 1)[-1].removeprefix(setting.flag).strip()
    assert reason and reason in str(by_fstab.value) and reason in str(by_config.value)


def test_a_flag_wins_over_the_registry_table_which_wins_over_the_top_level(tmp_path):
    config = _config(tmp_path, 'verify = "lazy"\n[registries."registry.example"]\nverify = "full"\n'
                               '[registries."other.example"]\nplain_http = true\n')
    args = cli._parser().parse_args(["mount", REF, "/mnt/x"])
    assert _value(args, "verify", config) == "full"
    assert settings.resolve("verify", None, config, "elsewhere.example") == "lazy"
    assert _value(cli._parser().parse_args(["mount", "--verify", "lazy", REF, "/mnt/x"]), "verify", config) == "lazy"
    assert _value(args, "plain_http", config) is False  # the other registry's table does not leak


def test_a_flag_wins_over_the_trust_scope_which_wins_over_the_top_level(tmp_path):
    """The signature settings resolve once with every other setting, for the reference's
    repository: the longest ``[trust."..."]`` scope containing it (cut at a '/'), then the top
    level; a flag over both. The policy the commands use is built from that one object."""
    from modelfs.compose import trust_policy
    from modelfs.reference import parse
    config = _config(tmp_path, 'signatures = "warn"\n'
                               '[trust."registry.example"]\nsignatures = "off"\n'
                               '[trust."registry.example/org"]\nsignatures = "enforce"\n')
    scoped = cli._parser().parse_args(["mount", REF, "/mnt/x"])
    assert _value(scoped, "signatures", config) == "enforce"
    assert mount_options(scoped).settings.trust_scope == "registry.example/org"
    sibling = cli._parser().parse_args(["mount", "registry.example/org-2/model:v1", "/mnt/x"])
    assert _value(sibling, "signatures", config) == "off"  # org-2 is not under org: the registry's scope
    elsewhere = cli._parser().parse_args(["mount", "other.example/org/model:v1", "/mnt/x"])
    assert _value(elsewhere, "signatures", config) == "warn"
    flagged = cli._parser().parse_args(["mount", "--signatures", "off", REF, "/mnt/x"])
    assert _value(flagged, "signatures", config) == "off"
    assert trust_policy(mount_options(flagged).settings, parse(REF)).mode == "off"
    with pytest.raises(ConfigError, match=r'needs a key .* \(config: \[trust."registry.example/org"\]\)'):
        trust_policy(mount_options(scoped).settings, parse(REF))
    with pytest.raises(ValueError, match="not registry.example/other"):  # settings of another repository
        trust_policy(mount_options(scoped).settings, parse("registry.example/other/model:v1"))


def test_unknown_options_and_keys_are_named():
    with pytest.raises(ConfigError, match="unknown mount option 'colour=blue'"):
        cli.mount_helper_argv([REF, "/mnt/x", "-o", "colour=blue"])
    with pytest.raises(ConfigError, match="unknown mount option 'timeout'"):  # a value option given no value
        cli.mount_helper_argv([REF, "/mnt/x", "-o", "timeout"])


# Text Python's own number parsing takes (str.isdigit, int(), float(), `\d`) but a setting must
# not: other scripts' digits, superscripts, underscores, and numbers past the setting's range.
NOT_NUMBERS = [("uid", "4294967296"), ("uid", "\u00b2"), ("gid", "\u0661\u0662"), ("gid", "4294967295"),
               ("workers", "\u0661"), ("workers", "1_0"), ("timeout", "\u0661"), ("timeout", "1_0"),
               ("cache_max_size", "\u0661\u0662M"), ("log_max_size", "9999999T"), ("file_mode", "\u0664\u0664\u0664"),
               ("dir_mode", "0_555"), ("metrics", "127.0.0.1:\u0668\u0660")]


@pytest.mark.parametrize(("name", "text"), NOT_NUMBERS)
def test_numbers_are_ascii_digits_in_range_on_every_surface(name, text, tmp_path):
    setting = settings.BY_NAME[name]
    with pytest.raises(ConfigError, match=f"^{setting.flag}[: ]"):
        cli._parser().parse_args(["mount", setting.flag, text, REF, "/mnt/x"])
    with pytest.raises(ConfigError, match=f"^-o {setting.fstab}[: ]"):
        cli.mount_helper_argv([REF, "/mnt/x", "-o", f"ro,{setting.fstab}={text}"])
    with pytest.raises(ConfigError, match=f": {name}[: ]"):
        _config(tmp_path, f'{name} = "{text}"\n')


@pytest.mark.parametrize(("line", "message"), [
    ("uid = 4294967296", "uid: '4294967296' is not a user id"),
    ("workers = inf", "workers must be a whole number"),
    ("timeout = nan", "timeout: 'nan' is not a number of seconds"),
    ("dir_mode = 0o555", 'dir_mode: write the mode as a string of octal digits, like "0444"'),  # was taken as 0o365
])
def test_toml_numbers_out_of_range_or_ambiguous_are_refused(line, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _config(tmp_path, line + "\n")
