"""TLS to registry endpoints: the SSL context an endpoint's hosts.toml settings make, and
what a TLS failure that retrying cannot fix means, with the setting that fixes it."""

from __future__ import annotations

import ssl
import threading
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from blockfs.registry._errors import RegistryTLSError
from blockfs.registry._hosts import HOSTS_FILE, Endpoint
from blockfs.registry._target import Target

# OpenSSL reasons for a TLS client that got something other than TLS back.
_NOT_TLS_REASONS = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL"}
)
# TLS alerts by which a server refuses the client certificate (or its absence).
_CLIENT_CERT_ALERTS = frozenset(
    {
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    }
)
# X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_MISMATCH_CODES = frozenset({62, 64})


def settings_location(ep: Endpoint, hosts_dir: Path | None) -> str:
    """Where the settings of ``ep`` go: its hosts.toml, or the one to create in
    ``hosts_dir`` (the client's hosts directory, if it has one)."""
    if ep.hosts_file is not None:
        return f"for {ep.origin} in {ep.hosts_file}"
    if hosts_dir is not None:
        return f"in {hosts_dir / ep.namespace / HOSTS_FILE} (a new file)"
    return (
        f"in DIR/{ep.namespace}/{HOSTS_FILE} and use DIR as the hosts directory "
        "(--hosts-dir; containerd's certs.d layout)"
    )


_default_lock = threading.Lock()
_default: ssl.SSLContext | None = None


def default_ssl_context() -> ssl.SSLContext:
    """The system's default client context, made once per process and shared (loading
    the system's CA certificates takes about 30 ms every time)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ssl.create_default_context()
        return _default


def ssl_context(ep: Endpoint, hosts_dir: Path | None) -> ssl.SSLContext:
    """The SSL context for ``ep``: its ``skip_verify``, ``ca`` and first ``client`` pair
    (the shared default one when it has none of them).

    Raises :class:`RegistryTLSError` naming the file that cannot be loaded.
    """
    if not (ep.skip_verify or ep.ca or ep.client_certs):
        return default_ssl_context()
    where = settings_location(ep, hosts_dir)
    context = ssl.create_default_context()
    if ep.skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    for ca in ep.ca:
        try:
            context.load_verify_locations(cafile=ca)
        except OSError as e:  # ssl.SSLError is an OSError too
            raise RegistryTLSError(
                f"cannot load the CA certificate {ca} for {ep.origin}: {e}",
                host=ep.host,
                hint=f"Fix the ca setting {where}: a PEM file of CA certificates",
            ) from e
    if ep.client_certs:
        # Like Go's TLS client with one configured pair, offer the first certificate.
        cert, key = ep.client_certs[0]
        try:
            context.load_cert_chain(cert, key)
        except OSError as e:  # ssl.SSLError is an OSError too
            files = cert if key is None else f"{cert} and {key}"
            raise RegistryTLSError(
                f"cannot load the client certificate {files} for {ep.origin}: {e}",
                host=ep.host,
                hint=f"Fix the client setting {where}: a PEM certificate and its key "
                "(one file holding both, or a [certificate, key] pair)",
            ) from e
    return context


def _ssl_cause(error: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` behind an httpx error (httpx wraps httpcore wraps ssl)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def tls_error(
    error: httpx.TransportError, ep: Endpoint, target: Target, host: str, hosts_dir: Path | None
) -> RegistryTLSError | None:
    """The error to raise at once for a TLS failure on ``host`` (``ep`` or a server it
    sends us to) that retrying cannot fix, or None (not TLS, or a TLS failure that may
    pass, such as the connection dropping)."""
    cause = _ssl_cause(error)
    if cause is None:
        return None
    where = settings_location(ep, hosts_dir)
    insecure = "(insecure: then anyone on the way can pose as the registry)"
    if isinstance(cause, ssl.SSLCertVerificationError):
        why = cause.verify_message or cause.reason or str(cause)
        if cause.verify_code in _NAME_MISMATCH_CODES:
            hostname = urlsplit(f"//{host}").hostname or host
            message = f"the TLS certificate of {host} is not valid for {hostname} ({why})"
            hint = (
                "Dial the registry by a name its certificate lists, give it a certificate "
                f"for {hostname}, or set skip_verify = true {where} {insecure}"
            )
        else:
            message = f"the TLS certificate of {host} is not trusted ({why})"
            hint = (
                'Set ca = "/path/to/ca.pem" (the CA that signed the registry\'s '
                f"certificate) {where}, or skip_verify = true {insecure}"
            )
    elif cause.reason in _NOT_TLS_REASONS:
        message = f"{host} does not speak TLS (the TLS handshake got {cause.reason})"
        hint = (
            f"If it is a plain-HTTP registry, write http://{host} instead of "
            f"{ep.origin} in {ep.hosts_file}"
            if ep.hosts_file is not None
            else "If it is a plain-HTTP registry, ask for plain HTTP (--plain-http)"
        )
    elif cause.reason in _CLIENT_CERT_ALERTS:
        if not ep.client_certs:
            message = (
                f"{host} refused the TLS connection ({cause.reason}): it requires a client "
                "certificate and none is configured for it"
            )
            hint = f'Set client = [["/path/client.pem", "/path/client.key"]] {where}'
        else:
            message = (
                f"{host} refused our TLS client certificate {ep.client_certs[0][0]} "
                f"({cause.reason})"
            )
            hint = (
                "Use a client certificate that the registry trusts (signed by one of its "
                f"client CAs, not expired) and its key, set as client {where}"
            )
    else:
        return None
    return target.error(RegistryTLSError, message, host, hint=hint)
