"""Throwaway X.509 material for TLS tests, made with the ``openssl`` command.

:func:`make_pki` creates a CA and, signed by it, a server certificate for 127.0.0.1
(an IP subjectAltName, what a client checks when it dials an address) and a client
certificate for mutual TLS. :func:`issue` signs further certificates, e.g. one for a
name the client does not dial. Keys are P-256 (quick to make); the extensions are the
ones a strict verifier expects (CA basicConstraints and keyUsage, key identifiers,
extendedKeyUsage on the leaves).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest

_DAYS = "2"
_NEW_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@attrs.frozen
class CertKey:
    """A PEM certificate and its PEM private key."""

    cert: Path
    key: Path


@attrs.frozen
class PKI:
    """A CA and the certificates it signed, all files in ``directory``."""

    directory: Path
    ca: CertKey
    server: CertKey  # for IP 127.0.0.1
    client: CertKey  # extendedKeyUsage clientAuth

    @property
    def ca_cert(self) -> Path:
        """The CA certificate, what a client trusts."""
        return self.ca.cert


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed:\n{done.stderr}")


def make_ca(directory: Path, name: str = "ca") -> CertKey:
    """A self-signed CA certificate and key: ``NAME.pem`` and ``NAME.key``."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    ca = CertKey(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl(
        "req", "-x509", *_NEW_KEY, "-sha256", "-days", _DAYS,
        "-subj", f"/CN=blockfs test {name}",
        "-config", "/dev/null",  # only the extensions below, none from openssl.cnf
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
        "-keyout", str(ca.key), "-out", str(ca.cert),
    )  # fmt: skip
    return ca


def issue(
    ca: CertKey,
    directory: Path,
    name: str,
    *,
    subject_alt_names: Sequence[str] = (),
    usage: str = "serverAuth",
) -> CertKey:
    """A certificate signed by ``ca``: ``NAME.pem`` and ``NAME.key`` in ``directory``.

    ``subject_alt_names`` are openssl SAN entries (``IP:127.0.0.1``, ``DNS:localhost``);
    ``usage`` its extendedKeyUsage (``serverAuth`` or ``clientAuth``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    out = CertKey(directory / f"{name}.pem", directory / f"{name}.key")
    request = directory / f"{name}.csr"
    extensions = directory / f"{name}.ext"
    lines = [
        "basicConstraints = critical, CA:FALSE",
        "keyUsage = critical, digitalSignature",
        f"extendedKeyUsage = {usage}",
        "subjectKeyIdentifier = hash",
        "authorityKeyIdentifier = keyid",
    ]
    if subject_alt_names:
        lines.append(f"subjectAltName = {', '.join(subject_alt_names)}")
    extensions.write_text("\n".join(lines) + "\n")
    _openssl(
        "req", "-new", *_NEW_KEY, "-config", "/dev/null", "-subj", f"/CN=blockfs test {name}",
        "-keyout", str(out.key), "-out", str(request),
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca.cert), "-CAkey", str(ca.key),
        "-CAcreateserial", "-days", _DAYS, "-sha256", "-extfile", str(extensions),
        "-out", str(out.cert),
    )  # fmt: skip
    request.unlink()
    extensions.unlink()
    return out


def make_pki(directory: Path) -> PKI:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, in ``directory``."""
    ca = make_ca(directory)
    server = issue(ca, directory, "server", subject_alt_names=["IP:127.0.0.1"])
    client = issue(ca, directory, "client", usage="clientAuth")
    return PKI(directory, ca, server, client)


def combined_pem(pair: CertKey, path: Path) -> Path:
    """The certificate and its key in one PEM file (the single-file ``client`` form)."""
    path.write_text(pair.cert.read_text() + pair.key.read_text())
    return path
