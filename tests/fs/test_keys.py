"""Key sources, the platform root secret and svn-aware sealing keys."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest

from cove.fs import keys
from cove.fs.keys import KeySourceError
from cove.platform import root_secret, sealing


@dataclass(frozen=True)
class Ident:
    measurement: bytes = b"\x01" * 32
    signer: bytes = b"\x02" * 32
    product_id: int = 7
    svn: int = 3
    debug: bool = False


@pytest.fixture(autouse=True)
def platform(tmp_path, monkeypatch):
    monkeypatch.setenv("COVE_PLATFORM_DIR", str(tmp_path / "platform"))
    return tmp_path / "platform"


def test_root_secret_is_created_private_and_stable(platform):
    first = root_secret.root_secret()
    assert len(first) == 32
    path = platform / "root-secret"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(platform).st_mode) == 0o700
    assert root_secret.root_secret() == first


def test_root_secret_refuses_an_open_file(platform):
    root_secret.root_secret()
    os.chmod(platform / "root-secret", 0o644)
    with pytest.raises(root_secret.PlatformError, match="not a private file"):
        root_secret.root_secret()


def test_root_secret_refuses_a_damaged_file(platform):
    root_secret.root_secret()
    (platform / "root-secret").write_bytes(b"short")
    with pytest.raises(root_secret.PlatformError, match="holds 5 bytes"):
        root_secret.root_secret()


def test_concurrent_first_use_agrees(platform):
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(root_secret.root_secret())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 8 and len(set(seen)) == 1
    assert [p.name for p in platform.iterdir()] == ["root-secret"]


def test_mrenclave_key_depends_on_measurement_only():
    a = sealing.sealing_key(Ident(), "mrenclave")
    assert len(a) == 16
    assert sealing.sealing_key(Ident(signer=b"\x09" * 32), "mrenclave") == a
    assert sealing.sealing_key(Ident(measurement=b"\x05" * 32), "mrenclave") != a


def test_mrsigner_key_survives_a_new_measurement_but_not_a_new_signer_or_product():
    a = sealing.sealing_key(Ident(), "mrsigner")
    assert sealing.sealing_key(Ident(measurement=b"\x05" * 32), "mrsigner") == a
    assert sealing.sealing_key(Ident(signer=b"\x09" * 32), "mrsigner") != a
    assert sealing.sealing_key(Ident(product_id=8), "mrsigner") != a
    assert sealing.sealing_key(Ident(), "mrenclave") != a


def test_debug_enclaves_get_other_keys():
    for policy in sealing.POLICIES:
        assert sealing.sealing_key(Ident(debug=True), policy) != sealing.sealing_key(Ident(), policy)


def test_svn_rules():
    ident = Ident(svn=3)
    own = sealing.sealing_key(ident, "mrsigner")
    assert sealing.sealing_key(ident, "mrsigner", 3) == own
    older = sealing.sealing_key(ident, "mrsigner", 1)
    assert older != own
    # a patched enclave (svn 5) derives what svn 1 and svn 3 sealed
    patched = replace(ident, svn=5, measurement=b"\x07" * 32)
    assert sealing.sealing_key(patched, "mrsigner", 1) == older
    assert sealing.sealing_key(patched, "mrsigner", 3) == own
    # an older enclave (svn 2) cannot derive the key of svn 3
    with pytest.raises(sealing.SealingError, match="sealed at svn 3 cannot be unsealed by an enclave with svn 2"):
        sealing.sealing_key(replace(ident, svn=2), "mrsigner", 3)


def test_another_platform_derives_other_keys(tmp_path, monkeypatch):
    a = sealing.sealing_key(Ident(), "mrenclave")
    monkeypatch.setenv("COVE_PLATFORM_DIR", str(tmp_path / "other-platform"))
    assert sealing.sealing_key(Ident(), "mrenclave") != a


def test_platform_seal_round_trip_and_label_binding():
    blob = sealing.seal(b"master key material", label="cove-kbs-master-key")
    assert b"master key" not in blob
    assert sealing.unseal(blob, label="cove-kbs-master-key") == b"master key material"
    with pytest.raises(sealing.SealingError, match="does not open"):
        sealing.unseal(blob, label="other")
    broken = bytearray(blob)
    broken[-1] ^= 1
    with pytest.raises(sealing.SealingError):
        sealing.unseal(bytes(broken), label="cove-kbs-master-key")


@pytest.mark.parametrize(
    "text, words",
    [
        ("seal:mrfoo", "not a sealing policy"),
        ("file:", "needs the path"),
        ("insecure:1234", "32 hex digits"),
        ("kbs:../x", "not a resource path"),
        ("tpm:x", "unknown key source kind"),
        ("plain", "not a key source"),
    ],
)
def test_key_source_syntax(text, words):
    with pytest.raises(KeySourceError, match=words):
        keys.parse(text)


def _hostile_key_file(tmp_path, kind):
    path = tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "device":
        return "/dev/zero"
    else:  # oversize: a regular file of many MiB whose first bytes are a valid hex key
        with open(path, "wb") as out:
            out.write(os.urandom(16).hex().encode() + b"\n")
            out.truncate(64 << 20)
    return str(path)


@pytest.mark.parametrize("kind", ["fifo", "folder", "device", "oversize"])
def test_a_hostile_key_file_is_refused_at_once_without_its_size(tmp_path, kind):
    """Key files are read as root for others: no blocking, no device, no unbounded read, no size told."""
    path = _hostile_key_file(tmp_path, kind)
    outcome: list[BaseException | bytes] = []

    def read() -> None:
        try:
            outcome.append(keys.read_key_file(path))
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive() and kind == "fifo":  # let the old code's blocked open go before failing
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
    assert outcome and isinstance(outcome[0], KeySourceError), f"{kind}: {outcome or 'still reading'}"
    message = outcome[0].message
    assert "\n" not in message and path in message
    assert str(64 << 20) not in message and "bytes" not in message


def test_key_sources_resolve(tmp_path):
    raw = os.urandom(16)
    (tmp_path / "raw.key").write_bytes(raw)
    (tmp_path / "hex.key").write_text(raw.hex() + "\n")
    (tmp_path / "bad.key").write_bytes(b"x" * 20)
    assert keys.resolve(f"file:{tmp_path / 'raw.key'}") == raw
    assert keys.resolve(f"file:{tmp_path / 'hex.key'}") == raw
    with pytest.raises(KeySourceError, match="holds no key"):
        keys.resolve(f"file:{tmp_path / 'bad.key'}")
    with pytest.raises(KeySourceError, match="not found"):
        keys.resolve(f"file:{tmp_path / 'none.key'}")
    assert keys.resolve("insecure:" + raw.hex()) == raw
    assert keys.resolve("seal:mrsigner", Ident()) == sealing.sealing_key(Ident(), "mrsigner")
    assert keys.resolve("seal:mrsigner", Ident(svn=4), svn=2) == sealing.sealing_key(Ident(), "mrsigner", 2)
    with pytest.raises(KeySourceError, match="needs the identity"):
        keys.resolve("seal:mrenclave")
    with pytest.raises(KeySourceError, match="sealed at svn 2 cannot be unsealed"):
        keys.resolve("seal:mrenclave", Ident(svn=1), svn=2)
    assert "insecure:<key>" == str(keys.parse("insecure:" + raw.hex()))


@pytest.fixture
def no_kbs_resolver() -> Iterator[None]:
    """No "kbs" resolver (as in a process that never launched an enclave with [attestation]); whatever was
    registered is put back afterwards."""
    before = keys.register_resolver("kbs", None)
    try:
        yield
    finally:
        keys.register_resolver("kbs", before)


def test_kbs_keys_use_the_registered_resolver(no_kbs_resolver):
    with pytest.raises(KeySourceError, match="key broker"):
        keys.resolve("kbs:default/k/1")
    assert keys.register_resolver("kbs", lambda source, ident, svn: b"K" * 16) is None
    assert keys.resolve("kbs:default/k/1") == b"K" * 16

    def short(source: keys.KeySource, ident: object, svn: int | None) -> bytes:
        return b"K" * 15

    keys.register_resolver("kbs", short)
    with pytest.raises(KeySourceError, match="15-byte key"):
        keys.resolve("kbs:default/k/1")
    assert keys.register_resolver("kbs", None) is short
    with pytest.raises(KeySourceError, match="key broker"):  # taken away: the kind is unknown again
        keys.resolve("kbs:default/k/1")
