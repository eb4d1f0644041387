"""A throw-away AMD-like PKI for SNP tests that need reports the real VCEK never signed."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

AMD = "1.3.6.1.4.1.3704.1."
START = datetime(2024, 1, 1, tzinfo=timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pss():
    return padding.PSS(padding.MGF1(hashes.SHA384()), 48)


def _ext(oid: str, der: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), der)


def _int(v: int) -> bytes:
    return bytes([0x02, 1, v]) if v < 0x80 else bytes([0x02, 2, 0, v])


class ForgedAmd:
    """ARK -> ASK -> VCEK/VLEK, all signed with RSA-PSS SHA-384 like AMD's."""

    def __init__(self, product: str = "Milan"):
        self.product = product
        self.ark_key = rsa.generate_private_key(65537, 2048)
        self.ask_key = rsa.generate_private_key(65537, 2048)
        self.ark = self.issue(
            _name(f"ARK-{product}"), _name(f"ARK-{product}"), self.ark_key.public_key(), self.ark_key, ca=True
        )
        self.ask = self.issue(
            _name(f"SEV-{product}"), _name(f"ARK-{product}"), self.ask_key.public_key(), self.ark_key, ca=True
        )
        self.asvk_key = rsa.generate_private_key(65537, 2048)
        self.asvk = self.issue(
            _name(f"SEV-VLEK-{product}"), _name(f"ARK-{product}"), self.asvk_key.public_key(), self.ark_key, ca=True
        )

    def issue(self, subject, issuer, pub, signer, *, ca, exts=(), days=3650):
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(pub)
            .serial_number(1)
            .not_valid_before(START)
            .not_valid_after(START + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        for e in exts:
            b = b.add_extension(e, critical=False)
        return b.sign(signer, hashes.SHA384(), rsa_padding=_pss())

    def chain_pem(self) -> bytes:
        """ASK, ARK and ASVK, in the order of AMD's published bundles."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.ask, self.ark, self.asvk))

    def endorsement(
        self, tcb: dict[str, int], *, hwid: bytes | None = None, csp: str | None = None, by_ask: bool = False
    ):
        """A VCEK (hwid) or VLEK (csp) and its key; a VLEK is signed by the ASVK unless ``by_ask``."""
        key = ec.generate_private_key(ec.SECP384R1())
        exts = [_ext(AMD + "2", b"\x16" + bytes([len(self.product)]) + self.product.encode())]
        oids = {"bootloader": "3.1", "tee": "3.2", "snp": "3.3", "microcode": "3.8", "fmc": "3.9"}
        exts += [_ext(AMD + oids[k], _int(v)) for k, v in tcb.items()]
        if hwid is not None:
            exts.append(_ext(AMD + "4", hwid))
        if csp is not None:
            exts.append(_ext(AMD + "5", b"\x16" + bytes([len(csp)]) + csp.encode()))
        cn = "SEV-VLEK" if csp else "SEV-VCEK"
        issuer, signer = (self.asvk.subject, self.asvk_key) if csp and not by_ask else (self.ask.subject, self.ask_key)
        cert = self.issue(_name(cn), issuer, key.public_key(), signer, ca=False, exts=exts, days=365)
        return key, cert.public_bytes(serialization.Encoding.DER)


def sign_report(body: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """Replace the signature of a 1184-byte report with one by ``key``."""
    signed = body[:0x2A0]
    r, s = decode_dss_signature(key.sign(signed, ec.ECDSA(hashes.SHA384())))
    return signed + r.to_bytes(72, "little") + s.to_bytes(72, "little") + bytes(0x4A0 - 0x2A0 - 144)


def set_field(report: bytes, offset: int, value: bytes) -> bytes:
    return report[:offset] + value + report[offset + len(value) :]
