"""Secret kinds: what an admin can upload or have the broker generate.

A secret lives at a resource path ``repository/type/tag`` and has a kind:

==============  =====================================================  ==========================
kind            what the broker keeps                                  what an enclave receives
==============  =====================================================  ==========================
``data``        uploaded bytes                                         the bytes
``aes-256``     32 random bytes                                        the 32 bytes
``ec-p256``,    a generated private key                                 PKCS#8 PEM private key
``ec-p384``,
``rsa-2048``,
``rsa-3072``,
``rsa-4096``
``cert``        a generated private key (``key`` param, EC P-256       PEM: private key, then a
                by default)                                            certificate issued at release
                                                                       by the broker's CA for the
                                                                       attested enclave, then the CA
``password``    random text (``length`` param, default 32)             the text, UTF-8
==============  =====================================================  ==========================

Each rotation adds a version; the current one is released unless a request
names another. The public half of a key pair is kept beside it (readable by
admins even when the secret is never exportable).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets as pysecrets
import string
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from cove.attest import certs
from cove.kbs.problems import Problem

KEY_KINDS = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")
GENERATED_KINDS = ("aes-256", *KEY_KINDS, "cert", "password")
KINDS = ("data", *GENERATED_KINDS)
MAX_DATA = 1 << 20
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_PASSWORD_ALPHABET = string.ascii_letters + string.digits + "-_.~!@#%^*+="
# Certificate extensions naming the enclave's measurement and signer (raw bytes),
# under a UUID-derived arc (2.25, ITU-T X.667) that needs no registration.
_ARC = "2.25.103569984538889555265208037853941382935"
OID_MEASUREMENT = x509.ObjectIdentifier(_ARC + ".1")
OID_SIGNER = x509.ObjectIdentifier(_ARC + ".2")


def check_path(repository: str, kind: str, tag: str) -> str:
    """``repository/type/tag`` after checking each segment, or a 404-class problem."""
    for name, value in (("repository", repository), ("type", kind), ("tag", tag)):
        if not isinstance(value, str) or not _SEGMENT.match(value):
            raise Problem(
                "InvalidRequestPath", f"resource {name} {value!r} must be 1-128 letters, digits, '.', '_' or '-'"
            )
    return f"{repository}/{kind}/{tag}"


def split_path(path: str) -> tuple[str, str, str]:
    parts = path.strip("/").split("/")
    if len(parts) != 3:
        raise Problem("InvalidRequestPath", f"resource path {path!r} is not repository/type/tag")
    check_path(*parts)
    return parts[0], parts[1], parts[2]


@dataclass(frozen=True)
class Material:
    """A secret version's value and, for key pairs, its public half."""

    value: bytes
    public: dict[str, Any] | None = None


def check_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters a kind accepts, with defaults; a problem names a wrong one."""
    if kind not in KINDS:
        raise Problem("InvalidRequest", f"kind {kind!r} is not one of {', '.join(KINDS)}")
    params = dict(params or {})
    allowed = {"password": {"length"}, "cert": {"key", "days"}}.get(kind, set())
    for name in params:
        if name not in allowed:
            raise Problem(
                "InvalidRequest",
                f"kind {kind} takes no parameter {name!r}"
                + (f" (allowed: {', '.join(sorted(allowed))})" if allowed else ""),
            )
    if kind == "password":
        length = params.setdefault("length", 32)
        if isinstance(length, bool) or not isinstance(length, int) or not 12 <= length <= 256:
            raise Problem("InvalidRequest", "password length must be an integer 12..256")
    if kind == "cert":
        key = params.setdefault("key", "ec-p256")
        if key not in KEY_KINDS:
            raise Problem("InvalidRequest", f"cert key {key!r} is not one of {', '.join(KEY_KINDS)}")
        days = params.setdefault("days", 30)
        if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 825:
            raise Problem("InvalidRequest", "cert days must be an integer 1..825")
    return params


def _private_key(kind: str) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if kind.startswith("ec-"):
        return ec.generate_private_key(ec.SECP256R1() if kind == "ec-p256" else ec.SECP384R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=int(kind.split("-")[1]))


def _pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_pem(key: PrivateKeyTypes) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def generate(kind: str, params: dict[str, Any]) -> Material:
    """A fresh value for a generated kind."""
    if kind == "aes-256":
        return Material(pysecrets.token_bytes(32))
    if kind == "password":
        length = params.get("length", 32)
        return Material("".join(pysecrets.choice(_PASSWORD_ALPHABET) for _ in range(length)).encode())
    if kind in KEY_KINDS or kind == "cert":
        key = _private_key(kind if kind != "cert" else params.get("key", "ec-p256"))
        return Material(_pem(key), {"public_key_pem": _public_pem(key)})
    raise Problem("InvalidRequest", f"kind {kind} is not generated; upload a value instead")


def from_upload(kind: str, value: bytes) -> Material:
    """An uploaded value, checked to fit its kind."""
    if len(value) > MAX_DATA:
        raise Problem("InvalidRequest", f"a secret value is at most {MAX_DATA} bytes")
    if kind == "data":
        if not value:
            raise Problem("InvalidRequest", "an uploaded value must not be empty")
        return Material(value)
    if kind == "aes-256":
        if len(value) != 32:
            raise Problem("InvalidRequest", "an aes-256 value is exactly 32 bytes")
        return Material(value)
    if kind == "password":
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise Problem("InvalidRequest", "a password must be UTF-8 text") from None
        return Material(value)
    if kind in KEY_KINDS or kind == "cert":
        try:
            key = serialization.load_pem_private_key(value, password=None)
        except (ValueError, TypeError):
            raise Problem("InvalidRequest", f"a {kind} value must be an unencrypted PEM private key") from None
        expected = kind if kind != "cert" else None
        actual = _kind_of_key(key)
        if expected and actual != expected:
            raise Problem("InvalidRequest", f"the uploaded key is {actual or 'of another type'}, not {kind}")
        if actual is None:
            raise Problem("InvalidRequest", f"the uploaded key is not one of {', '.join(KEY_KINDS)}")
        return Material(_pem(key), {"public_key_pem": _public_pem(key)})
    raise Problem("InvalidRequest", f"kind {kind!r} is not one of {', '.join(KINDS)}")


def _kind_of_key(key: PrivateKeyTypes) -> str | None:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name)
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size in (2048, 3072, 4096):
        return f"rsa-{key.key_size}"
    return None


class IssuingKeys:
    """The parsed private keys of ``cert`` secrets, per (path, version), at most ``size`` of them.

    Parsing a PEM key costs 3 ms (P-256) to 0.8 s (RSA-4096, whose full validation runs under the
    interpreter lock) and a ``cert`` secret's key is the same at every release; each entry keeps
    the PEM's digest, so a secret deleted and made again at the same path and version is parsed
    afresh. Keys are loaded with ``unsafe_skip_rsa_key_validation``: every stored key was made by
    the broker or loaded with full validation on upload (:func:`from_upload`), and comes back
    through the vault's authenticated decryption unchanged. ``loads`` counts the parses."""

    def __init__(self, size: int = 256):
        self.size = size
        self.loads = 0
        self._keys: OrderedDict[tuple[str, int], tuple[bytes, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()

    def get(self, path: str, version: int, private_pem: bytes) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
        digest = hashlib.sha256(private_pem).digest()
        with self._lock:
            found = self._keys.get((path, version))
            if found is not None and found[0] == digest:
                self._keys.move_to_end((path, version))
                return found[1]
        key = serialization.load_pem_private_key(private_pem, password=None, unsafe_skip_rsa_key_validation=True)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise Problem("Unavailable", f"the stored key of {path} is not an EC or RSA key")
        with self._lock:
            self.loads += 1
            self._keys[(path, version)] = (digest, key)
            self._keys.move_to_end((path, version))
            while len(self._keys) > self.size:
                self._keys.popitem(last=False)
        return key


issuing_keys = IssuingKeys()


def issue_certificate(
    private_pem: bytes,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    claims: dict[str, Any],
    path: str,
    days: int,
    now: dt.datetime | None = None,
    version: int = 0,
) -> bytes:
    """A certificate for the secret's key, naming the attested enclave, signed by the broker's CA.

    CPU-bound (a signature, and a key parse the first time): servers run it in their pool."""
    now = now or dt.datetime.now(dt.timezone.utc)
    key = issuing_keys.get(path, version, private_pem)
    name = str(claims.get("name") or claims.get("tee") or "enclave")[:64]
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"cove-kbs {path}"[:64]),
        ]
    )
    extensions = []
    for oid, claim in ((OID_MEASUREMENT, "measurement"), (OID_SIGNER, "signer")):
        value = claims.get(claim)
        if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{2,128}", value):
            extensions.append(x509.UnrecognizedExtension(oid, bytes.fromhex(value)))
    cert = certs.issue_leaf(
        ca_key,
        ca_cert,
        key.public_key(),
        subject,
        days=days,
        now=now,
        usage=certs.key_usage(key_encipherment=True, key_agreement=True),
        extended_usage=[x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH],
        extensions=extensions,
    )
    return private_pem + certs.pem(cert) + certs.pem(ca_cert)
