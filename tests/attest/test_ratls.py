"""RA-TLS over real TLS on loopback: Python's ssl on both sides, and openssl s_client / s_server as peers.

A handshake completes into a usable connection only when the peer's
evidence satisfies the policy; otherwise the checking side closes it.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cove.attest import ratls
from cove.attest.errors import VerificationError
from cove.attest.policy import parse_policy
from cove.platform import endorse, pak
from cove.platform.reports import EnclaveClaims, ReportSigner
from cove.platform.runtime_measurement import runtime_hash
from tests.conftest import require

GOOD, OTHER = b"\x61" * 32, b"\x62" * 32
KEY = pak.generate()
SIGNER = ReportSigner(KEY, endorse.self_certified(pak.spki(KEY), runtime_hash()))


def source(measurement: bytes = GOOD):
    claims = EnclaveClaims(measurement, b"\x70" * 32, 1, 1, False, "sim", "namespaces+seccomp", "ratls")
    return lambda report_data: SIGNER.evidence(claims, report_data)


def policy(measurement: bytes = GOOD):
    return parse_policy(f'[cove]\nself_certified = true\nmeasurements = ["{measurement.hex()}"]\n')


CERT, CERT_KEY = ratls.make_certificate(source())
BAD_CERT, BAD_KEY = ratls.make_certificate(source(OTHER))


def test_certificate_carries_bound_evidence():
    cert = x509.load_pem_x509_certificate(CERT)
    ext = cert.extensions.get_extension_for_oid(ratls.OID_TAGGED_EVIDENCE)
    tagged = cbor2.loads(ext.value.value)
    assert tagged.tag == 60000 and len(tagged.value) == 2
    claims = cbor2.loads(tagged.value[1])
    hash_id, digest = cbor2.loads(claims["pubkey-hash"])
    assert hash_id == 1 and digest == hashlib.sha256(ratls.spki(cert.public_key())).digest()
    evidence, report_data = ratls.evidence_from_certificate(CERT)
    assert report_data == hashlib.sha256(tagged.value[1]).digest() + bytes(32)
    verdict = ratls.verify_certificate(CERT, policy())
    assert verdict.accepted and verdict.appraisal.report_data == report_data
    assert not ratls.verify_certificate(CERT, policy(OTHER)).accepted
    der = cert.public_bytes(serialization.Encoding.DER)
    assert ratls.evidence_from_certificate(der) == (evidence, report_data)


def _cert_with(key, evidence: bytes, claims: bytes) -> bytes:
    now = datetime.now(timezone.utc)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "forged")])
    ext = cbor2.dumps(cbor2.CBORTag(60000, [evidence, claims]))
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.UnrecognizedExtension(ratls.OID_TAGGED_EVIDENCE, ext), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def test_evidence_cannot_be_moved_to_another_key():
    evidence, _ = ratls.evidence_from_certificate(CERT)
    original_claims = cbor2.loads(
        x509.load_pem_x509_certificate(CERT).extensions.get_extension_for_oid(ratls.OID_TAGGED_EVIDENCE).value.value
    ).value[1]
    thief = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(VerificationError, match="pubkey-hash is not the certificate's key"):
        ratls.evidence_from_certificate(_cert_with(thief, evidence, original_claims))
    # Claims rewritten for the thief's key no longer match the evidence's report data.
    moved = _cert_with(thief, evidence, ratls.claims_for(thief.public_key()))
    verdict = ratls.verify_certificate(moved, policy())
    assert not verdict.accepted and "report data does not match" in verdict.result.reasons[0]


def test_gramine_style_self_signed_certificate_and_other_hashes():
    key = ec.generate_private_key(ec.SECP384R1())
    for hash_id in (1, 7, 8):
        claims = ratls.claims_for(key.public_key(), hash_id)
        cert = _cert_with(key, source()(ratls.report_data_for(claims)), claims)
        assert ratls.verify_certificate(cert, policy()).accepted


@pytest.mark.parametrize(
    "ext_value, fragment",
    [
        (cbor2.dumps([b"", b""]), "not CBOR tag 60000"),
        (cbor2.dumps(cbor2.CBORTag(60000, [b"x"])), "[evidence, claims]"),
        (cbor2.dumps(cbor2.CBORTag(60000, [b"x", cbor2.dumps({"pubkey-hash": cbor2.dumps([2, b"x"])})])), "hash id"),
        (
            cbor2.dumps(cbor2.CBORTag(60000, [b"x", cbor2.dumps({"pubkey-hash": cbor2.dumps([[1], b"x"])})])),
            "hash id",
        ),  # an unhashable hash id raised TypeError
        (b"\xff\xff", "not valid CBOR"),
    ],
)
def test_malformed_extensions(ext_value, fragment):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "bad")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.UnrecognizedExtension(ratls.OID_TAGGED_EVIDENCE, ext_value), critical=False)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(VerificationError) as err:
        ratls.evidence_from_certificate(cert)
    assert fragment in err.value.message


_DER = x509.load_pem_x509_certificate(CERT).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    "old, new, kind",
    [
        (b"\x06\x03\x55\x1d\x0f", b"\x06\x03\x55\x1d\x13", "DuplicateExtension"),  # keyUsage -> basicConstraints
        (bytes.fromhex("2a8648ce3d0201"), bytes.fromhex("2a8648ce3d0209"), "UnsupportedAlgorithm"),  # unknown key type
        (b"\x30\x82", b"\x31\x82", "ValueError"),  # the outer SEQUENCE is a SET
        (b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x2d", "InvalidVersion"),  # X.509 version 46
    ],
)
def test_a_malformed_certificate_is_a_rejection_naming_the_parser_failure(old: bytes, new: bytes, kind: str) -> None:
    """Each of cryptography's documented failures is caught by name (the old bare except caught everything)."""
    assert old in _DER
    with pytest.raises(VerificationError, match=f"not a valid certificate \\({kind}\\)"):
        ratls.evidence_from_certificate(_DER.replace(old, new, 1))


# -- real TLS on loopback


class Server:
    """A one-connection-at-a-time TLS server in a thread: greets accepted peers, records rejections."""

    def __init__(self, ctx: ssl.SSLContext):
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.errors: list[str] = []
        self.verdicts: list = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    self.verdicts.append(getattr(tls, "verdict", None))
                    tls.sendall(b"hello from the enclave\n")
                    tls.recv(1)
            except (ssl.SSLError, OSError) as exc:
                self.errors.append(str(exc))
            finally:
                conn.close()

    def close(self):
        self.sock.close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    made = []

    def start(ctx):
        s = Server(ctx)
        made.append(s)
        return s

    yield start
    for s in made:
        s.close()


def connect(port: int, ctx: ssl.SSLContext) -> tuple[bytes, object]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as tls:
            data = tls.recv(100)
            return data, tls.verdict


def test_python_client_checks_the_server(server):
    s = server(ratls.server_context(CERT, CERT_KEY))
    data, verdict = connect(s.port, ratls.client_context(policy()))
    assert data == b"hello from the enclave\n" and verdict.appraisal.measurement == GOOD
    with pytest.raises(ratls.RaTlsError, match="peer rejected by policy"):
        connect(s.port, ratls.client_context(policy(OTHER)))


def test_mutual_attestation(server):
    s = server(ratls.server_context(CERT, CERT_KEY, client_policy=policy()))
    data, verdict = connect(s.port, ratls.client_context(policy(), cert_pem=CERT, key_pem=CERT_KEY))
    assert data == b"hello from the enclave\n"
    assert s.verdicts[-1].appraisal.measurement == GOOD
    # A client whose evidence the server's policy refuses gets no data.
    with pytest.raises((ssl.SSLError, OSError, ConnectionError)):
        data, _ = connect(s.port, ratls.client_context(policy(), cert_pem=BAD_CERT, key_pem=BAD_KEY))
        assert data == b""
        raise ConnectionError("closed without data")
    deadline = time.monotonic() + 5
    while not any("peer rejected by policy" in e for e in s.errors) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert any("peer rejected by policy" in e for e in s.errors), s.errors
    # A client without a certificate cannot complete the handshake.
    with pytest.raises((ssl.SSLError, OSError, ConnectionError)):
        data, _ = connect(s.port, ratls.client_context(policy()))
        assert data == b""
        raise ConnectionError("closed without data")


def test_a_certificate_without_its_key_is_refused():
    # Found by mypy: the key was written as None, a TypeError after the temporary files were made.
    with pytest.raises(ValueError, match="without its private key"):
        ratls.client_context(policy(), cert_pem=CERT)


def test_openssl_s_client_as_the_attested_peer(server, tmp_path):
    openssl = require("openssl")
    s = server(ratls.server_context(CERT, CERT_KEY, client_policy=policy()))
    for name, cert, key in (("good", CERT, CERT_KEY), ("bad", BAD_CERT, BAD_KEY)):
        (tmp_path / f"{name}.pem").write_bytes(cert)
        (tmp_path / f"{name}.key").write_bytes(key)

    def s_client(name):
        return subprocess.run(
            [
                openssl,
                "s_client",
                "-connect",
                f"127.0.0.1:{s.port}",
                "-quiet",
                "-cert",
                str(tmp_path / f"{name}.pem"),
                "-key",
                str(tmp_path / f"{name}.key"),
            ],
            input=b"x",
            capture_output=True,
            timeout=30,
        )

    assert b"hello from the enclave" in s_client("good").stdout
    assert b"hello from the enclave" not in s_client("bad").stdout
    deadline = time.monotonic() + 10  # the server thread records the refusal after the client is gone
    while not any("peer rejected by policy" in e for e in s.errors) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any("peer rejected by policy" in e for e in s.errors), s.errors


@pytest.fixture
def s_server(tmp_path):
    procs = []

    def start(cert: bytes, key: bytes) -> int:
        openssl = require("openssl")
        (tmp_path / "srv.pem").write_bytes(cert)
        (tmp_path / "srv.key").write_bytes(key)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = subprocess.Popen(
            [
                openssl,
                "s_server",
                "-accept",
                f"127.0.0.1:{port}",
                "-cert",
                str(tmp_path / "srv.pem"),
                "-key",
                str(tmp_path / "srv.key"),
                "-quiet",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as c:
                if c.connect_ex(("127.0.0.1", port)) == 0:
                    return port
            time.sleep(0.05)
        raise AssertionError("openssl s_server did not start")

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_python_client_against_openssl_s_server(s_server):
    port = s_server(CERT, CERT_KEY)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ratls.client_context(policy()).wrap_socket(raw) as tls:
            assert tls.verdict.accepted and tls.verdict.appraisal.measurement == GOOD
    bad_port = s_server(BAD_CERT, BAD_KEY)
    with socket.create_connection(("127.0.0.1", bad_port), timeout=10) as raw:
        with pytest.raises(ratls.RaTlsError, match="is not one the policy accepts"):
            ratls.client_context(policy()).wrap_socket(raw)


def test_cove_verify_takes_an_ra_tls_certificate(cove, tmp_path):
    from tests.conftest import error_line

    (tmp_path / "cert.pem").write_bytes(CERT)
    good = tmp_path / "good.toml"
    good.write_text(f'[cove]\nself_certified = true\nmeasurements = ["{GOOD.hex()}"]\n')
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[cove]\nself_certified = true\nmeasurements = ["{OTHER.hex()}"]\n')
    assert cove("verify", tmp_path / "cert.pem", "--policy", good).returncode == 0
    result = cove("verify", tmp_path / "cert.pem", "--policy", bad)
    assert result.returncode == 6 and "is not one the policy accepts" in error_line(result)
    both = cove("verify", tmp_path / "cert.pem", "--policy", good, "--report-data", "00" * 64)
    assert both.returncode == 2 and "cannot be used with an RA-TLS certificate" in error_line(both)
