"""A local TLS CA and server certificate for a broker (`cove kbs init`, `cove demo`, tests).

Production deployments bring their own certificate (``--cert``/``--key``);
this makes a small private CA and a server certificate for the names given
(by default ``localhost`` and ``127.0.0.1``) so that HTTPS works on a fresh
machine and clients pin the CA with ``--ca``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from cove.attest import certs
from cove.util import write_atomic


def make_local_tls(
    folder: Path, names: tuple[str, ...] = ("localhost", "127.0.0.1"), days: int = 825
) -> tuple[Path, Path, Path]:
    """Write tls-ca.pem, tls.crt and tls.key (0600) into folder; returns (ca, cert, key)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key = certs.new_key()
    ca = certs.self_signed_ca(ca_key, "Cove KBS local TLS CA", days=days)
    key = certs.new_key()
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    cert = certs.issue_leaf(
        ca_key, ca, key.public_key(), names[0], days=days, extended_usage=[ExtendedKeyUsageOID.SERVER_AUTH], san=alt
    )
    ca_path, cert_path, key_path = folder / "tls-ca.pem", folder / "tls.crt", folder / "tls.key"
    write_atomic(ca_path, certs.pem(ca))
    write_atomic(cert_path, certs.pem(cert) + certs.pem(ca))
    write_atomic(key_path, certs.private_key_pem(key), mode=0o600)
    return ca_path, cert_path, key_path
