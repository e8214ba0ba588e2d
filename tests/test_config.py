from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from substituter.cli import main
from substituter.config import CACHE_NIXOS_ORG_KEY, Config, load_config, parse_config, parse_size
from substituter.errors import ConfigError


def test_defaults_without_a_file() -> None:
    config = load_config(None)
    assert config.listen == "127.0.0.1:37515"
    assert config.trusted_public_keys == (CACHE_NIXOS_ORG_KEY,)
    assert [f.type for f in config.fetchers] == ["binary-cache"]
    assert config.fetchers[0].options["url"] == "https://cache.nixos.org"
    assert config.dataspace.connect is None


def test_design_example_parses(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('''
listen = "127.0.0.1:37515"
trusted-public-keys = ["cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]

[dataspace]

[[fetchers]]
type = "binary-cache"
url = "https://cache.nixos.org"
priority = 40

[[fetchers]]
type = "local-mirror"
path = "/srv/nix-cache"
''')
    config = load_config(f)
    assert [(c.type, c.priority) for c in config.fetchers] == [("binary-cache", 40), ("local-mirror", None)]
    assert config.fetchers[1].options == {"path": "/srv/nix-cache"}
    assert config.fetchers[1].name == "local-mirror:/srv/nix-cache"


def test_json_config(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"listen": "[::1]:9000", "nar-cache": {"max-size": "512M"}}))
    config = load_config(f)
    assert config.listen == "[::1]:9000" and config.nar_cache.max_size == 512 * 2**20


@pytest.mark.parametrize(("raw", "message"), [
    ({"lisen": "x"}, "unknown key 'lisen'"),
    ({"listen": 5}, "listen: expected str"),
    ({"listen": "localhost"}, "HOST:PORT"),
    ({"trusted-public-keys": ["nope"]}, "trusted-public-keys[0]"),
    ({"dataspace": {"conect": "x"}}, "unknown key 'dataspace.conect'"),
    ({"dataspace": {"connect": '<unix "/x">'}}, "needs dataspace.cap"),
    ({"dataspace": {"tcp": "0.0.0.0:1"}}, "not loopback"),
    ({"fetchers": [{"url": "x"}]}, "missing 'type'"),
    ({"fetchers": [{"type": "a", "name": "n"}, {"type": "b", "name": "n"}]}, "used twice"),
    ({"fetchers": [{"type": "a", "priority": "high"}]}, "fetchers[0].priority"),
    ({"nar-cache": {"max-size": "lots"}}, "nar-cache.max-size"),
    ({"locate-timeout": 0}, "locate-timeout"),
    ({"log-level": "loud"}, "log-level"),
])
def test_bad_config_names_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(raw)
    assert message in str(exc.value)


def test_sizes() -> None:
    assert parse_size("10G", "x") == 10 * 2**30
    assert parse_size("1.5KiB", "x") == 1536
    assert parse_size(123, "x") == 123


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(f'[[fetchers]]\ntype = "local-mirror"\npath = "{tmp_path}"\n')
    result = CliRunner().invoke(main, ["daemon", "--config", str(good), "--check-config"])
    assert result.exit_code == 0, result.output
    assert "configuration OK" in result.output
    bad_option = tmp_path / "bad.toml"
    bad_option.write_text('[[fetchers]]\ntype = "binary-cache"\nurl = "http://127.0.0.1:1"\ntimeout = 3\n')
    result = CliRunner().invoke(main, ["daemon", "--config", str(bad_option), "--check-config"])
    assert result.exit_code == 2 and "unknown option 'timeout'" in result.output
    unknown_type = tmp_path / "type.toml"
    unknown_type.write_text('[[fetchers]]\ntype = "carrier-pigeon"\n')
    result = CliRunner().invoke(main, ["daemon", "--config", str(unknown_type), "--check-config"])
    assert result.exit_code == 2 and "carrier-pigeon" in result.output and "binary-cache" in result.output


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Config().listen = "x"  # type: ignore[misc]


def test_nar_cache_sizes() -> None:
    config = parse_config({"nar-cache": {"verify-first": "8M", "prefetch": "256K"}})
    assert (config.nar_cache.verify_first, config.nar_cache.prefetch) == (8 << 20, 256 << 10)
    assert parse_config({}).nar_cache.prefetch == 1 << 20
    assert parse_config({"nar-cache": {"prefetch": 0}}).nar_cache.prefetch == 0
    with pytest.raises(ConfigError, match="nar-cache.prefetch"):
        parse_config({"nar-cache": {"prefetch": "lots"}})


def test_stream_zstd_is_off_unless_asked() -> None:
    assert parse_config({}).nar_cache.stream_zstd is False
    assert parse_config({"nar-cache": {"stream-zstd": True}}).nar_cache.stream_zstd is True
    with pytest.raises(ConfigError, match="stream-zstd"):
        parse_config({"nar-cache": {"stream-zstd": "yes"}})
