"""Releases: a `cert` release's issuing runs in the pool, once per release, with its key parsed once per
version (it blocked the event loop for up to 0.8 s per release, and a busy database made it issue two
certificates); a TEE key is taken only in canonical base64url, with full-length EC coordinates and a
bounded RSA e; a TEE key that cannot receive a resource is an audited 4xx refusal, never a 500."""

from __future__ import annotations

import base64
import secrets
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc import jwk

from cove.kbs import client as kbs_client
from cove.kbs import jose
from cove.kbs import secrets as secrets_mod
from cove.kbs.problems import Problem
from tests.kbs.conftest import release_policy
from tests.kbs.test_loop_work import ForeignWriter

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _ec_with_short_x(crv: str = "P-256") -> dict:
    """A real point whose x has a leading zero byte, written without it (RFC 7518 requires full length)."""
    size = {"P-256": 32, "P-384": 48}[crv]
    curve = ec.SECP256R1() if crv == "P-256" else ec.SECP384R1()
    while True:
        numbers = ec.generate_private_key(curve).public_key().public_numbers()
        if numbers.x < 1 << (8 * (size - 1)):
            return {
                "kty": "EC",
                "crv": crv,
                "x": b64e(numbers.x.to_bytes(size - 1, "big")),
                "y": b64e(numbers.y.to_bytes(size, "big")),
            }


def _non_canonical(text: str) -> str:
    """The same bytes with the unused low bit of the last character set: 'AB' for 'AA'."""
    return text[:-1] + ALPHABET[ALPHABET.index(text[-1]) ^ 1]


def _rsa_public(e: int, bits: int = 2048) -> dict:
    """An RSA public JWK; n need only be odd and of its size for an import (and for OAEP)."""
    n = secrets.randbits(bits) | (1 << (bits - 1)) | 1
    return {
        "kty": "RSA",
        "n": b64e(n.to_bytes(bits // 8, "big")),
        "e": b64e(e.to_bytes((e.bit_length() + 7) // 8, "big")),
    }


def _ec_key(crv: str = "P-256") -> dict:
    return jose.public_jwk(jwk.generate_key("EC", crv))


def _changed(crv: str, member: str, change) -> dict:
    key = _ec_key(crv)
    return dict(key, **{member: change(key[member])})


def _longer(text: str) -> str:
    return b64e(b"\0" + base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _changed("P-256", "x", _non_canonical), id="non-canonical-x"),
        pytest.param(
            lambda: _changed("P-256", "y", _non_canonical), id="non-canonical-y"
        ),  # P-384, P-521: no spare bits
        pytest.param(lambda: dict(_rsa_public(3), e="Ax"), id="non-canonical-e"),  # 3 is 'Aw'
        pytest.param(lambda: _ec_with_short_x("P-256"), id="short-x-p256"),
        pytest.param(lambda: _ec_with_short_x("P-384"), id="short-x-p384"),
        pytest.param(lambda: _changed("P-256", "x", _longer), id="long-x"),
        pytest.param(lambda: _rsa_public((1 << 32) + 1), id="e-2**32+1"),
        pytest.param(lambda: _rsa_public((1 << 64) + 1, 4096), id="e-2**64+1"),
        pytest.param(lambda: _rsa_public((1 << 95) + 1), id="e-96-bits"),
    ],
)
def test_loose_tee_keys_refused(make):
    with pytest.raises(Problem, match="not a valid public key") as caught:
        jose.tee_key(make())
    assert caught.value.kind == "InvalidRequest"


def test_the_non_canonical_ab_is_refused_where_aa_is_read():
    key = _rsa_public(65537)
    with pytest.raises(Problem, match="not canonical"):
        jose.tee_key(dict(key, n=key["n"][:-2] + "AB"))
    key["n"] = key["n"][:-2] + "AA"
    jose.tee_key(key)  # the canonical spelling imports


@pytest.mark.parametrize("e", [3, 65537, (1 << 32) - 1])
def test_rsa_exponents_in_range_accepted(e):
    assert jose.tee_key(_rsa_public(e))[1] == "RSA-OAEP-256"


def _forged_token(kbs, tee_pubkey: dict) -> kbs_client.KbsClient:
    """A client whose bearer token (signed by this broker, as an older broker may have signed it) carries
    a TEE key that the current checks refuse."""
    attested = kbs.client()
    claims = kbs.broker.tokens.verify(attested.attest(kbs.sample()))
    holder = kbs.client()
    holder.token = kbs.broker.tokens.issue(tee_pubkey, claims["tcb-status"], "allowed")
    return holder


def _audit(kbs, action: str = "release") -> list[tuple[str, str]]:
    return [(e["outcome"], e["resource"]) for e in kbs.broker.store.audit_log(action=action)]


@pytest.mark.parametrize("kind", ["data", "cert"])
def test_a_tee_key_that_cannot_receive_is_an_audited_refusal(make_kbs, kind):
    """Regression: an RSA-4096 key with a 65-bit e imported, then OAEP failed at release: a 500, unaudited."""
    kbs = make_kbs()
    kbs.admin.put_policy("p", release_policy())
    kbs.admin.create_secret(f"app/{kind}/one", kind, "p", value=b"v" if kind == "data" else None)
    holder = _forged_token(kbs, _rsa_public((1 << 64) + 1, 4096))
    with pytest.raises(kbs_client.KbsError) as caught:
        holder.resource_document(f"app/{kind}/one", bearer=True)
    assert caught.value.kind == "InvalidRequest" and 400 <= (caught.value.status or 0) < 500
    assert ("refused", f"app/{kind}/one@1") in _audit(kbs)
    assert not [e for e in _audit(kbs) if e[0] == "ok"]


def _cert_secret(kbs, key: str = "rsa-2048") -> kbs_client.KbsClient:
    kbs.admin.put_policy("p", release_policy())
    kbs.admin.create_secret("app/cert/tls", "cert", "p", params={"key": key})
    client = kbs.client()
    client.attest(kbs.sample())
    return client


def _recording(monkeypatch) -> list[str]:
    """The threads issue_certificate ran in, one entry per certificate issued."""
    issued: list[str] = []
    real = secrets_mod.issue_certificate

    def issue(*args, **kwargs):
        issued.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(secrets_mod, "issue_certificate", issue)
    return issued


def test_cert_releases_run_in_the_pool_and_parse_the_key_once(make_kbs, monkeypatch):
    """Regression: every release parsed (and validated) the RSA key again, on the event loop."""
    kbs = make_kbs()
    client = _cert_secret(kbs)
    issued = _recording(monkeypatch)
    loads = secrets_mod.issuing_keys.loads
    leaves = {x509.load_pem_x509_certificates(client.resource("app/cert/tls"))[0].serial_number for _ in range(4)}
    assert len(leaves) == 4 and len(issued) == 4
    assert all(name.startswith("cove-kbs_") for name in issued), issued  # the pool's threads, never the loop's
    assert secrets_mod.issuing_keys.loads == loads + 1
    kbs.admin.rotate_secret("app/cert/tls")  # a new version: its own key, parsed once
    key_v2 = client.resource("app/cert/tls")
    assert secrets_mod.issuing_keys.loads == loads + 2 and key_v2.count(b"BEGIN CERTIFICATE") == 2


def test_the_key_cache_is_bounded_and_follows_the_stored_key():
    keys = secrets_mod.IssuingKeys(size=2)
    pems = [secrets_mod.generate("ec-p256", {}).value for _ in range(3)]
    for version, pem in enumerate(pems):
        keys.get("a/b/c", version, pem)
    keys.get("a/b/c", 0, pems[0])  # evicted: parsed again
    assert keys.loads == 4
    keys.get("a/b/c", 2, pems[2])
    assert keys.loads == 4
    again = keys.get("a/b/c", 2, pems[1])  # the same path and version made again with another key
    assert keys.loads == 5 and again.private_numbers() != keys.get("a/b/c", 0, pems[0]).private_numbers()


def test_a_busy_database_at_a_cert_release_issues_one_certificate(make_kbs, tmp_path, monkeypatch):
    """Regression: the final audit's Busy ran the whole release again in the pool: two certificates."""
    db = tmp_path / "busy.db"
    kbs = make_kbs(db=f"sqlite:///{db}")
    client = _cert_secret(kbs, "ec-p256")
    issued = _recording(monkeypatch)
    done: list[bytes] = []
    worker = threading.Thread(target=lambda: done.append(client.resource("app/cert/tls")))
    with ForeignWriter(db, "sqlite"):
        worker.start()
        time.sleep(0.5)
        assert not done
    worker.join(30)
    assert len(done) == 1 and len(issued) == 1
    assert [o for o, _r in _audit(kbs)] == ["ok"]
