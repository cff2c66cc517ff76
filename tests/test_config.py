import pytest

from modelfs.config import ConfigError, load, parse_size


def test_user_file_overrides_system_file(tmp_path):
    system = tmp_path / "system.toml"
    user = tmp_path / "user.toml"
    system.write_text('cache_dir = "/var/cache/x"\ncache_max_size = "2G"\nprefetch = "none"\n'
                      '[registries."r.example"]\nplain_http = true\nmirrors = ["http://127.0.0.1:6000", "m.example"]\n')
    user.write_text('prefetch = "all"\ntimeout = 5\n')
    config = load([str(system), str(user)])
    assert (config.cache_dir, config.cache_max_size, config.prefetch, config.timeout) == ("/var/cache/x", 2 << 30, "all", 5.0)
    registry = config.registry("r.example")
    assert registry.plain_http
    assert [(m.host, m.plain_http) for m in registry.mirrors] == [("127.0.0.1:6000", True), ("m.example", False)]
    assert config.registry("other.example").mirrors == []


@pytest.mark.parametrize("text, message", [
    ('cache_dri = "/x"\n', "unknown key 'cache_dri'"),
    ('[registries."r"]\nplain-http = true\n', "unknown key 'plain-http'"),
    ('prefetch = "some"\n', "must be 'all' or 'none'"),
    ('cache_max_size = "lots"\n', "is not a size"),
    ('cache_dir = \n', "Invalid value"),
])
def test_bad_config_names_file_and_key(tmp_path, text, message):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load([str(path)])
    assert str(path) in str(info.value) and message in str(info.value)


def test_sizes():
    assert parse_size("500M", "x") == 500 << 20
    assert parse_size("1.5GiB", "x") == int(1.5 * (1 << 30))
    assert parse_size(1234, "x") == 1234
    assert parse_size("", "x") == 0
