"""The daemon's configuration: TOML file, flags on top, checked values."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import attrs
import pytest

from snapshotter._jsonlog import JSONFormatter
from snapshotter.config import ConfigError, SnapshotterConfig, load_config
from snapshotter.daemon import build_parser, config_from_args, main


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_put_the_socket_under_the_root(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "c.toml", ""))
    assert config == SnapshotterConfig()
    assert config.socket == Path("/var/lib/blockfs/run/snapshotter.sock")
    moved = load_config(write(tmp_path / "d.toml", 'root = "/srv/bfs"\n'))
    assert moved.socket == Path("/srv/bfs/run/snapshotter.sock")


def test_file_values_are_converted(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path / "c.toml",
            'root = "/r"\naddress = "/s.sock"\nhosts_dir = "/h"\ncache_size = "2G"\n'
            'prefetch = false\nbackground_fetch = false\nattach = "nbdfuse"\n'
            'log_level = "DEBUG"\nmetrics_address = "127.0.0.1:9145"\n',
        )
    )
    assert config == SnapshotterConfig(
        root=Path("/r"),
        address=Path("/s.sock"),
        hosts_dir=Path("/h"),
        cache_size=2 << 30,
        prefetch=False,
        background_fetch=False,
        attach="nbdfuse",
        log_level="debug",
        metrics_address="127.0.0.1:9145",
    )


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", 'root = "/from-file"\nlog_level = "error"\nprefetch = true\n')
    args = build_parser().parse_args(
        ["--config", str(path), "--root", "/from-flag", "--no-prefetch", "--cache-size", "1M"]
    )
    config = config_from_args(args)
    assert (config.root, config.log_level, config.prefetch, config.cache_size) == (
        Path("/from-flag"),
        "error",
        False,
        1 << 20,
    )


def test_every_setting_is_a_flag_that_overrides_it(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "")
    argv = ["--config", str(path), "--address", "/s.sock", "--hosts-dir", "/h", "--attach", "nbd"]
    argv += ["--background-fetch", "--log-level", "warning", "--metrics-address", "[::1]:9"]
    args = build_parser().parse_args(argv)
    unset = {f.name for f in attrs.fields(SnapshotterConfig)} - set(vars(args))
    assert unset == set()
    config = config_from_args(args)
    assert (config.address, config.hosts_dir, config.attach) == (Path("/s.sock"), Path("/h"), "nbd")
    assert config.background_fetch and config.log_level == "warning"
    assert config.metrics_address == "[::1]:9"
    assert (
        config_from_args(build_parser().parse_args(["--config", str(path)])) == SnapshotterConfig()
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rooot = '/x'\n", "unknown keys \\['rooot'\\]"),
        ("cache_size = 'lots'\n", "not a size"),
        ("prefetch = 'yes'\n", "prefetch must be true or false"),
        ("attach = 'loop'\n", "attach"),
        ("log_level = 'loud'\n", "log_level must be one of"),
        ("metrics_address = '9145'\n", "HOST:PORT"),
        ("root = [\n", "not valid TOML"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path / "c.toml", text))


def test_missing_named_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_daemon_exits_2_on_a_bad_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "c.toml", "bogus = 1\n")
    assert main(["--config", str(path)]) == 2
    assert "unknown keys ['bogus']" in capsys.readouterr().err


def test_daemon_exits_2_on_a_bad_flag_and_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "c.toml", "")
    assert main(["--config", str(path), "--attach", "loop"]) == 2
    err = capsys.readouterr().err
    assert f"{path} with flags ['attach']: attach:" in err


def test_json_log_line_carries_extra_fields_and_errors() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    log = logging.getLogger("test.jsonlog")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            log.error("failed %s", "x", extra={"key": "k1", "path": Path("/p")}, exc_info=True)
    finally:
        log.removeHandler(handler)
    [line] = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["msg"] == "failed x" and record["level"] == "error"
    assert record["key"] == "k1" and record["path"] == "/p"
    assert "ValueError: boom" in record["error"]
