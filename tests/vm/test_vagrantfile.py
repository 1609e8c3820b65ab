"""The Vagrantfile: valid for Vagrant and its providers, and set up like the README says.

``vagrant validate`` runs when Debian's vagrant package is installed (tools/setup
installs it, with vagrant-libvirt); where it is missing these tests are skipped.
VirtualBox is not in Debian, so its provider block is only checked by Vagrant's
provider-independent validation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VAGRANTFILE = REPO / "Vagrantfile"

needs_vagrant = pytest.mark.skipif(
    shutil.which("vagrant") is None,
    reason="vagrant is not installed (tools/setup installs Debian's vagrant package)",
)


def vagrant_validate(tmp_path: Path, *args: str, provider: str | None = None) -> str:
    """``vagrant validate`` on the repository's Vagrantfile; its output (fails the test if it fails).

    Vagrant's state and home go to ``tmp_path`` so that the run leaves nothing behind.
    """
    env = {
        **os.environ,
        "VAGRANT_HOME": str(tmp_path / "vagrant-home"),
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "vagrant-dot"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
    }
    if provider is not None:
        env["VAGRANT_DEFAULT_PROVIDER"] = provider
    result = subprocess.run(
        ["vagrant", "validate", *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    if provider is not None and f"The provider '{provider}' could not be found" in output:
        pytest.skip(f"the vagrant-{provider} plugin is not installed")
    assert result.returncode == 0, output
    return output


@needs_vagrant
def test_vagrantfile_validates_with_the_libvirt_provider(tmp_path: Path) -> None:
    assert "validated successfully" in vagrant_validate(tmp_path, provider="libvirt")


@needs_vagrant
def test_vagrantfile_validates_without_provider_plugins(tmp_path: Path) -> None:
    assert "validated successfully" in vagrant_validate(tmp_path, "--ignore-provider")


def test_vagrantfile_provisions_with_tools_setup_and_loads_nbd() -> None:
    text = VAGRANTFILE.read_text()
    assert 'config.vm.box = "debian/bookworm64"' in text
    assert 'config.vm.provider "libvirt"' in text
    assert 'config.vm.provider "virtualbox"' in text
    # The README's setup script, not a second copy of its install steps.
    assert "cd /vagrant && tools/setup" in text
    assert "apt-get" not in text
    assert "modprobe nbd nbds_max=16 max_part=0" in text
    assert "options nbd nbds_max=16 max_part=0" in text
