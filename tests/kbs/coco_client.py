"""A clean-room Python stand-in for the Confidential Containers KBS client.

No Rust toolchain runs here, so the tests hold Cove's broker to a Python
client that sends what guest-components' ``kbs_protocol`` crate sends, byte
for byte, and reads answers the way it reads them. Every behaviour is pinned
to the source it was read from (facts about the protocol, not copied code):

GC = confidential-containers/guest-components @ 8246e5e0977f6322f0a1b0f77e0739cf1c3e1f74
KT = virtee/kbs-types 0.18.0 (the version GC's Cargo.lock pins; read from the published crate's src/lib.rs)
TR = confidential-containers/trustee @ 78962cd416dcc8a32f9377e0066a28fe21420f69
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass, field
from collections.abc import Callable

import httpx
import rfc8785
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash

# GC attestation-agent/kbs_protocol/src/client/mod.rs: KBS_PROTOCOL_VERSION, KBS_GET_RESOURCE_MAX_ATTEMPT, KBS_PREFIX
PROTOCOL_VERSION = "0.4.0"
GET_RESOURCE_MAX_ATTEMPT = 3
PREFIX = "kbs/v0"
# GC .../client/rcar_client.rs: RCAR_MAX_ATTEMPT, RCAR_RETRY_TIMEOUT_SECOND, DEFAULT_HASH_ALGORITHM, INIT_DATA_FORMAT
RCAR_MAX_ATTEMPT = 5
RCAR_RETRY_SECONDS = 1
DEFAULT_HASH = "sha384"
INIT_DATA_FORMAT = "toml"
# KT src/hash_algorithm.rs: HashAlgorithm::list_all(), serialized lowercase, parsed case-insensitively
HASH_ALGORITHMS = ("sha256", "sha384", "sha512", "sm3")
# KT src/lib.rs: enum Tee, as it serializes
TEES = (
    "az-snp-vtpm",
    "az-tdx-vtpm",
    "nvidia",
    "sgx",
    "snp",
    "tdx",
    "cca",
    "csv",
    "se",
    "hygondcu",
    "dpu",
    "tpm",
    "sample",
    "sampledevice",
)
# GC .../builder.rs: reqwest with cookie_store(true) and this user agent
USER_AGENT = "attestation-agent-kbs-client/0.1.0"


class CocoError(Exception):
    """The client's error enum (GC .../kbs_protocol/src/error.rs), by variant name."""

    def __init__(self, variant: str, detail: str = ""):
        super().__init__(f"{variant}: {detail}")
        self.variant = variant
        self.detail = detail


def serde_json(value) -> bytes:
    """serde_json::to_vec/to_string: compact, non-ASCII unescaped, members in the given order."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def serde_value(value, sort: bool):
    """A parsed serde_json::Value as it re-serializes: Map is a BTreeMap (sorted) by default, an
    IndexMap (insertion order) with serde_json's preserve_order feature, which any crate in the
    build may switch on. Both happen in the wild, so the broker must be right under both."""
    if isinstance(value, dict):
        items = sorted(value.items()) if sort else value.items()
        return {key: serde_value(item, sort) for key, item in items}
    if isinstance(value, list):
        return [serde_value(item, sort) for item in value]
    return value


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """KT: BASE64_URL_SAFE_NO_PAD decode, which refuses padding and the standard alphabet."""
    if not isinstance(text, str) or "=" in text or "+" in text or "/" in text:
        raise CocoError("DecryptResponseFailed", "not base64url without padding")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def protected_header_aad(header: dict, sort: bool) -> bytes:
    """KT ProtectedHeader::generate_aad: the struct {alg, enc, #[serde(flatten)] other_fields} re-serialized
    by serde_json and base64url-encoded. alg and enc come first (struct order); the rest follow as the Map
    keeps them (sorted, or as received)."""
    rebuilt = {"alg": header["alg"], "enc": header["enc"]}
    rebuilt.update(serde_value({k: v for k, v in header.items() if k not in ("alg", "enc")}, sort))
    return b64url(serde_json(rebuilt)).encode("ascii")


# -- the TEE key (GC .../kbs_protocol/src/keypair.rs) -------------------------------------------------
class TeeKeyPair:
    """TeeKeyAlgorithm: "ECDH-ES+A256KW-P256" (the default), "ECDH-ES+A256KW-P521", "RSA-OAEP-256".
    "ECDH-ES+A256KW-P384" is not one of the client's; it is here to drive Cove's P-384 support."""

    CURVES = {
        "ECDH-ES+A256KW-P256": (ec.SECP256R1(), "P-256", 32),
        "ECDH-ES+A256KW-P384": (ec.SECP384R1(), "P-384", 48),
        "ECDH-ES+A256KW-P521": (ec.SECP521R1(), "P-521", 66),
    }

    def __init__(self, algorithm: str = "ECDH-ES+A256KW-P256"):
        self.algorithm = algorithm
        if algorithm == "RSA-OAEP-256":
            self.key = rsa.generate_private_key(65537, 2048)  # crypto crate's RSAKeyPair::new: 2048 bits
        else:
            curve, self.crv, self.size = self.CURVES[algorithm]
            self.key = ec.generate_private_key(curve)

    def export_pubkey(self) -> dict:
        """KT TeePubKey, #[serde(tag = "kty")]: kty first, then the variant's fields in declaration order."""
        if isinstance(self.key, rsa.RSAPrivateKey):
            numbers = self.key.public_key().public_numbers()
            n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
            e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
            return {"kty": "RSA", "alg": "RSA-OAEP-256", "n": b64url(n), "e": b64url(e)}
        numbers = self.key.public_key().public_numbers()
        return {
            "kty": "EC",
            "crv": self.crv,
            "alg": "ECDH-ES+A256KW",
            "x": b64url(numbers.x.to_bytes(self.size, "big")),
            "y": b64url(numbers.y.to_bytes(self.size, "big")),
        }

    def unwrap_cek(self, header: dict, wrapped: bytes) -> bytes:
        """keypair.rs unwrap_cek: by header.alg; ECDH reads epk.crv/x/y and refuses another curve."""
        alg = header.get("alg")
        if alg == "RSA-OAEP-256" and isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.decrypt(wrapped, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))
        if alg == "ECDH-ES+A256KW" and isinstance(self.key, ec.EllipticCurvePrivateKey):
            epk = header.get("epk")
            if not isinstance(epk, dict) or not all(isinstance(epk.get(k), str) for k in ("crv", "x", "y")):
                raise CocoError("DecryptResponseFailed", "Invalid JWE ProtectedHeader")
            if epk["crv"] != self.crv:
                raise CocoError("DecryptResponseFailed", f"Unmatched curve: {epk['crv']}")
            x, y = b64url_decode(epk["x"]), b64url_decode(epk["y"])
            peer = ec.EllipticCurvePublicKey.from_encoded_point(self.key.curve, b"\x04" + x + y)
            z = self.key.exchange(ec.ECDH(), peer)
            other = len(alg).to_bytes(4, "big") + alg.encode() + bytes(8) + (256).to_bytes(4, "big")
            return keywrap.aes_key_unwrap(ConcatKDFHash(hashes.SHA256(), 32, other).derive(z), wrapped)
        raise CocoError("DecryptResponseFailed", f"Unsupported algorithm: {alg}")

    def decrypt_response(self, response: dict, sort: bool) -> bytes:
        """keypair.rs decrypt_response: the AAD is the header as serde re-serializes it, not the received text."""
        try:
            header = json.loads(b64url_decode(response["protected"]))
            cek = self.unwrap_cek(header, b64url_decode(response["encrypted_key"]))
            sealed = b64url_decode(response["ciphertext"]) + b64url_decode(response["tag"])
            return AESGCM(cek).decrypt(b64url_decode(response["iv"]), sealed, protected_header_aad(header, sort))
        except CocoError:
            raise
        except Exception as exc:
            raise CocoError("DecryptResponseFailed", f"{type(exc).__name__}: {exc}") from None

    def pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


# -- evidence providers (GC attestation-agent/attester/src/*) -----------------------------------------------
def hash_digest(algorithm: str, data: bytes) -> bytes:
    if algorithm == "sm3":
        return hashlib.new("sm3", data).digest()
    return hashlib.new(algorithm, data).digest()


class SampleAttester:
    """GC attester/src/sample/mod.rs: {"svn": "1", "report_data": base64(report data)}, svn a string."""

    tee = "sample"

    def get_evidence(self, report_data: bytes):
        return {"svn": "1", "report_data": base64.b64encode(report_data).decode()}


@dataclass
class FixedAttester:
    """Any evidence shape: make(report_data) builds it (tests use it for Cove, TPM and hardware evidence)."""

    tee: str
    make: Callable[[bytes], object]

    def get_evidence(self, report_data: bytes):
        return self.make(report_data)


@dataclass
class Exchange:
    method: str
    path: str
    body: bytes | None
    status: int


@dataclass
class CocoClient:
    """KbsClient<Box<dyn EvidenceProvider>> (GC .../client/rcar_client.rs), over httpx.

    ``additional``: device evidence by tee name, as the native evidence provider collects it
    (GC .../evidence_provider/native.rs: "" when there is none, else serde_json of the map).
    ``sort``: how serde_json keeps Map members in this build (see serde_value).
    """

    url: str
    attester: object
    verify: object = True
    algorithm: str = "ECDH-ES+A256KW-P256"
    init_data: str | None = None
    additional: dict = field(default_factory=dict)
    sort: bool = True
    sleep: Callable[[float], None] = time.sleep
    log: list = field(default_factory=list)

    def __post_init__(self):
        self.tee_key = TeeKeyPair(self.algorithm)
        self.http = httpx.Client(
            base_url=self.url.rstrip("/"), verify=self.verify, headers={"user-agent": USER_AGENT}, timeout=60
        )
        self.token: str | None = None
        self.sent: dict[str, bytes] = {}

    def close(self) -> None:
        self.http.close()

    def _send(self, method: str, path: str, body: bytes | None = None) -> httpx.Response:
        headers = {"content-type": "application/json"} if body is not None else None
        response = self.http.request(method, f"/{PREFIX}/{path}", content=body, headers=headers)
        self.log.append(Exchange(method, path, body, response.status_code))
        return response

    @staticmethod
    def _error_information(response: httpx.Response) -> dict:
        """KT ErrorInformation {type, detail}: both strings, or the body does not deserialize."""
        try:
            info = response.json()
        except ValueError:
            info = None
        if not (isinstance(info, dict) and isinstance(info.get("type"), str) and isinstance(info.get("detail"), str)):
            raise CocoError("KbsResponseDeserializationFailed", response.text[:200])
        return info

    # rcar_client.rs build_request / get_request_extra_params
    def request_body(self) -> bytes:
        return serde_json(
            {
                "version": PROTOCOL_VERSION,
                "tee": self.attester.tee,
                "extra-params": {"supported-hash-algorithms": list(HASH_ALGORITHMS)},
            }
        )

    @staticmethod
    def hash_algorithm(extra_params) -> str:
        """rcar_client.rs get_hash_algorithm: selected-hash-algorithm if extra-params has it (any case),
        else SHA-384; a non-string or unknown name is an error. A string extra-params has no members."""
        if not isinstance(extra_params, dict) or "selected-hash-algorithm" not in extra_params:
            return DEFAULT_HASH
        name = extra_params["selected-hash-algorithm"]
        if not isinstance(name, str):
            raise CocoError("UnexpectedJSONDataType", f"string, {serde_json(name).decode()}")
        if name.lower() not in HASH_ALGORITHMS:
            raise CocoError("InvalidHashAlgorithm", name.lower())
        return name.lower()

    def additional_evidence(self, device_report_data: bytes) -> str:
        if not self.additional:
            return ""
        return serde_json({tee: make(device_report_data) for tee, make in self.additional.items()}).decode()

    def rcar_handshake(self) -> None:
        """rcar_client.rs rcar_handshake: auth (200, else an error), attest (200, else an error)."""
        body = self.request_body()
        self.sent["auth"] = body
        response = self._send("POST", "auth", body)
        if response.status_code == 401:
            raise CocoError("RcarHandshake", f"KBS request unauthorized, {self._error_information(response)}")
        if response.status_code != 200:
            raise CocoError("RcarHandshake", f"KBS Server Internal Failed, Response: {response.text[:200]}")
        challenge = response.json()
        try:
            algorithm = self.hash_algorithm(challenge.get("extra-params"))
        except CocoError as exc:  # anyhow inside rcar_handshake; its callers map it to RcarHandshake
            raise CocoError("RcarHandshake", str(exc)) from None
        runtime_data = {"nonce": challenge["nonce"], "tee-pubkey": self.tee_key.export_pubkey()}
        # get_composite_evidence: devices bind the canonical runtime data; the primary TEE binds
        # {"tee-pubkey", "nonce", "additional-evidence"}, canonical JSON (RFC 8785), hashed.
        additional = self.additional_evidence(hash_digest(algorithm, rfc8785.dumps(runtime_data)))
        primary_runtime = {
            "tee-pubkey": runtime_data["tee-pubkey"],
            "nonce": runtime_data["nonce"],
            "additional-evidence": additional,
        }
        digest = hash_digest(algorithm, rfc8785.dumps(primary_runtime))
        evidence = {"primary_evidence": self.attester.get_evidence(digest), "additional_evidence": additional}
        init_data = {"format": INIT_DATA_FORMAT, "body": self.init_data} if self.init_data is not None else None
        # KT Attestation, rename_all kebab-case: init-data (null when absent), runtime-data, tee-evidence
        body = serde_json({"init-data": init_data, "runtime-data": runtime_data, "tee-evidence": evidence})
        self.sent["attest"] = body
        response = self._send("POST", "attest", body)
        if response.status_code == 401:
            raise CocoError("RcarHandshake", f"KBS attest unauthorized, {self._error_information(response)}")
        if response.status_code != 200:
            raise CocoError("RcarHandshake", f"KBS Server Internal Failed, Response: {response.text[:200]}")
        self.token = response.json()["token"]

    def get_token(self) -> str:
        """rcar_client.rs repeat_rcar_handshake: up to RCAR_MAX_ATTEMPT tries, a second apart."""
        for attempt in range(1, RCAR_MAX_ATTEMPT + 1):
            try:
                self.rcar_handshake()
                return self.token or ""
            except CocoError as exc:
                if attempt >= RCAR_MAX_ATTEMPT:
                    raise CocoError("RcarHandshake", f"retried {RCAR_MAX_ATTEMPT} times: {exc}") from None
                self.sleep(RCAR_RETRY_SECONDS)
        raise AssertionError("unreachable")

    def get_resource(self, path: str) -> bytes:
        """rcar_client.rs get_resource: GET with the session cookie; 401 runs a new handshake and tries
        again (3 tries in all, then UnAuthorized); 404 is ResourceNotFound; anything else is fatal."""
        for _ in range(GET_RESOURCE_MAX_ATTEMPT):
            response = self._send("GET", f"resource/{path.strip('/')}")
            if response.status_code == 200:
                try:
                    document = response.json()
                except ValueError:
                    raise CocoError("KbsResponseDeserializationFailed", response.text[:200]) from None
                return self.tee_key.decrypt_response(document, self.sort)
            if response.status_code == 401:
                self._error_information(response)
                self.rcar_handshake()
                continue
            info = self._error_information(response)
            if response.status_code == 404:
                raise CocoError("ResourceNotFound", info["detail"])
            raise CocoError("KbsInternalError", f"{response.status_code} {info['detail']}")
        raise CocoError("UnAuthorized")
