"""The files shipped for deployment and the generated gRPC code agree with the code."""

from __future__ import annotations

import configparser
import os
import subprocess
import tomllib
from pathlib import Path

import pytest

from snapshotter.config import SnapshotterConfig

PROJECT = Path(__file__).resolve().parents[2]
UNIT = PROJECT / "tools" / "systemd" / "blockfs-snapshotter.service"
CONTAINERD_SNIPPET = PROJECT / "tools" / "containerd" / "config.toml"


def test_generated_code_matches_the_proto_files() -> None:
    proc = subprocess.run(
        [str(PROJECT / "tools" / "gen-protos"), "--check"],
        capture_output=True,
        text=True,
        cwd=PROJECT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_containerd_snippet_dials_the_default_snapshotter_socket() -> None:
    snippet = tomllib.loads(CONTAINERD_SNIPPET.read_text())
    plugin = snippet["proxy_plugins"]["blockfs"]
    assert plugin == {"type": "snapshot", "address": str(SnapshotterConfig().socket)}
    cri = snippet["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri == {"snapshotter": "blockfs", "disable_snapshot_annotations": False}


def test_containerd_reads_the_snippet() -> None:
    if not os.access("/usr/bin/containerd", os.X_OK):
        pytest.skip("containerd is not installed")
    dump = subprocess.run(
        ["/usr/bin/containerd", "--config", str(CONTAINERD_SNIPPET), "config", "dump"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    merged = tomllib.loads(dump)
    assert merged["proxy_plugins"]["blockfs"]["type"] == "snapshot"
    cri = merged["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri["snapshotter"] == "blockfs" and cri["disable_snapshot_annotations"] is False


def test_systemd_unit_restarts_only_the_daemon_process() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    assert service["KillMode"] == "process"  # the NBD server outlives daemon restarts
    assert service["Type"] == "notify"
    assert service["ExecStart"].split()[0].endswith("/blockfs-snapshotter")
