"""The one reader of untrusted structured data (cove.decode), and every document read through it.

Each hostile input (trailing bytes, oversized, nested too deep, wrong types,
unknown keys, broken encodings) must end in the reading layer's own error
type, as one line, never a decoder's exception or a traceback.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cove.attest._cbor import Fields as attest_fields
from cove.attest._cbor import loads as attest_loads
from cove.attest.errors import VerificationError
from cove.decode import MAX_DOCUMENT, Fields, Settings, decode_cbor, decode_json, decode_toml
from cove.errors import ConfigError, CoveError, IntegrityError
from cove.fs import volume_format
from cove.fs.anchor import AnchorError, FileAnchor
from cove.fs.errors import VolumeIntegrityError
from cove.image import manifest, signing, tree
from cove.image.tree import Entry, decode_entries, encode_entries


class Bad(Exception):
    """A stand-in layer error: the decoder must raise exactly the class it is given."""


DEEP_CBOR = b"\x81" * 100_000 + b"\x00"
DEEP_JSON = "[" * 100_000 + "]" * 100_000


# -- the decoders ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x01\x00", "1 trailing bytes after doc"),
        (b"", "not valid CBOR"),
        (b"\x82\x01", "not valid CBOR"),  # truncated
        (DEEP_CBOR, "not valid CBOR"),  # nested past the depth limit
        (b"\xa2\x61a\x01\x61a\x02", "not valid CBOR"),  # a duplicate key
        (b"\x61\xff", "not valid CBOR"),  # text that is not UTF-8
        (b"\xd8\x23\x61(", "not valid CBOR"),  # a regular expression tag that is not one
        (b"\xd8\x25\x41\x00", "not valid CBOR"),  # a UUID tag of one byte
        (b"\x5b" + b"\xff" * 8, "not valid CBOR"),  # a length far past the end
        (cbor2.dumps(b"x" * MAX_DOCUMENT), "at most"),  # oversized
        ("text", "must be bytes"),
    ],
)
def test_decode_cbor_refuses(data, fragment):
    with pytest.raises(Bad, match=fragment):
        decode_cbor(data, Bad, "doc")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ('{"a": 1} x', "not valid JSON"),
        ("{", "not valid JSON"),
        (DEEP_JSON, "not valid JSON"),
        (b'"\xff"', "not valid JSON"),
        ("[" + "1," * MAX_DOCUMENT + "1]", "at most"),
    ],
)
def test_decode_json_refuses(data, fragment):
    with pytest.raises(Bad, match=fragment):
        decode_json(data, Bad, "doc")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a = ", "not valid TOML"),
        ("a = 1\na = 2\n", "not valid TOML"),
        ("a = " + "[" * 100_000, "not valid TOML"),
        ("a = 1\n" + "#" * MAX_DOCUMENT, "characters"),
    ],
)
def test_decode_toml_refuses(text, fragment):
    with pytest.raises(Bad, match=fragment):
        decode_toml(text, Bad, "doc")


def test_decoders_return_what_is_valid():
    assert decode_cbor(cbor2.dumps({"a": [1, b"x"]}), Bad, "doc") == {"a": [1, b"x"]}
    assert decode_json('{"a": [1, "x"]}', Bad, "doc") == {"a": [1, "x"]}
    assert decode_toml("a = [1, 'x']", Bad, "doc") == {"a": [1, "x"]}


# -- the field accessor ------------------------------------------------------------------------

DOC = {"n": 5, "b": b"\x01" * 4, "t": "vm", "f": True, "h": "00ff", "m": {"x": 1}, "l": [{"x": 1}, 2]}


@pytest.mark.parametrize(
    ("read", "fragment"),
    [
        (lambda f: f.uint("missing"), "doc lacks missing"),
        (lambda f: f.uint("t"), "doc t must be an integer from 0 to"),
        (lambda f: f.uint("f"), "doc f must be an integer"),  # a boolean is not an integer
        (lambda f: f.integer("n", 0, 4), "doc n must be an integer from 0 to 4"),
        (lambda f: f.bytes("b", 3), "doc b must be 3 bytes, not 4"),
        (lambda f: f.bytes("b", max_size=2), "doc b is too long"),
        (lambda f: f.bytes("t"), "doc t must be a byte string"),
        (lambda f: f.text("n"), "doc n must be a short text string"),
        (lambda f: f.text("t", ("sim",)), "doc t 'vm' is not one of sim"),
        (lambda f: f.text("t", max_len=1), "doc t must be a short text string"),
        (lambda f: f.boolean("n"), "doc n must be true or false"),
        (lambda f: f.hex("t"), "doc t is not hex"),
        (lambda f: f.hex("h", 3), "doc h must be 3 bytes, not 2"),
        (lambda f: f.sub("n"), "doc n must be a map"),
        (lambda f: f.sub("m", ("y",)), "doc m has an unknown field 'x'"),
        (lambda f: f.sub("m").uint("y"), "doc m lacks y"),
        (lambda f: f.list("m"), "doc m must be a list"),
        (lambda f: f.list("l", max_items=1), "doc l must be a list of 0 to 1 items"),
        (lambda f: f.maps("l"), r"doc l\[1\] must be a map"),
        (lambda f: f.byte_list("l"), "doc l must hold byte strings"),
        (lambda f: f.value("n", str), "doc n must be str, not int"),
        (lambda f: f.value("f", int), "doc f must be int, not bool"),
    ],
)
def test_fields_refuse(read: Callable[[Fields], object], fragment: str):
    with pytest.raises(Bad, match=fragment):
        read(Fields(DOC, "doc", Bad))


def test_fields_read_what_is_valid():
    f = Fields(DOC, "doc", Bad, tuple(DOC))
    assert (f.uint("n"), f.bytes("b", 4), f.text("t", ("vm",)), f.boolean("f"), f.hex("h", 2)) == (
        5,
        b"\x01" * 4,
        "vm",
        True,
        b"\x00\xff",
    )
    assert f.sub("m", ("x",)).uint("x") == 1 and f.list("l") == ({"x": 1}, 2)
    assert Fields({"l": [{"x": 1}]}, "doc", Bad).maps("l", ("x",))[0].uint("x") == 1
    assert f.bytes("nope", optional=True) is None and f.sub("nope", optional=True) is None
    assert f.integer("nope", default=7) == 7 and f.text("nope", default="d") == "d"
    with pytest.raises(Bad, match="doc has an unknown field 'n'"):
        Fields(DOC, "doc", Bad, ("b",))
    with pytest.raises(Bad, match="doc must be a map"):
        Fields([1], "doc", Bad)


LISTS = {
    "s": ["a", "b"],
    "e": ["a", ""],
    "x": ["00", " 0f\n", "0g"],
    "d": ["30s", 2, "1.5m", "500ms", "1d"],
    "nan": float("nan"),
    "inf": float("inf"),
    "neg": -1,
    "yes": True,
    "big": "9" * 70,
    "sp": "00 ff",
    "empty": "",
    "odd": "abc",
}


@pytest.mark.parametrize(
    ("read", "fields_says", "settings_says"),
    [
        (
            lambda f: f.strings("e"),
            "doc e must be a list of non-empty text strings",
            "f: doc.e: must be a list of non-empty strings",
        ),
        (
            lambda f: f.strings("x", max_len=2),
            "doc x must be a list of non-empty",
            "f: doc.x: must be a list of non-empty",
        ),
        (
            lambda f: f.strings("nan"),
            "doc nan must be a list of 0 to 4096 items",
            "f: doc.nan: must be a list, not float",
        ),
        (
            lambda f: f.strings("s", max_items=1),
            "doc s must be a list of 0 to 1 items",
            "f: doc.s: must have 0 to 1 items, not 2",
        ),
        (lambda f: f.hex_list("x"), r"doc x\[1\] is not hex", r"f: doc.x\[2\]: must be a hex string"),
        (lambda f: f.hex_list("s", 1), r"doc s\[0\] is not hex", r"f: doc.s\[0\]: must be a hex string"),
        (lambda f: f.hex("sp"), "doc sp is not hex", "f: doc.sp: must be a hex string"),  # fromhex took the space
        (lambda f: f.hex("odd"), "doc odd is not hex", "f: doc.odd: must be a hex string"),
        (lambda f: f.hex("empty"), "doc empty must not be empty", "f: doc.empty: must not be empty"),
        (lambda f: f.hex("neg"), "doc neg is not hex", "f: doc.neg: must be a hex string"),
        (
            lambda f: f.hex_list("x", 2),
            r"doc x\[0\] must be 2 bytes, not 1",
            r"f: doc.x\[0\]: must be 2 bytes \(4 hex digits\), not 1",
        ),
        (lambda f: f.duration("nan"), "doc nan must be a finite number of seconds", "f: doc.nan: must be a finite"),
        (lambda f: f.duration("inf"), "doc inf must be a finite", "f: doc.inf: must be a finite"),
        (lambda f: f.duration("neg"), "doc neg must be more than zero", "f: doc.neg: must be more than zero"),
        (
            lambda f: f.duration("yes"),
            "doc yes must be seconds or a duration",
            "f: doc.yes: must be seconds or a duration",
        ),
        (lambda f: f.duration("big"), "doc big must be seconds or a duration", "f: doc.big: must be seconds"),
        (lambda f: f.duration("s"), "doc s must be seconds or a duration", "f: doc.s: must be seconds"),
    ],
)
def test_lists_hex_and_durations_refuse_in_both_wordings(
    read: Callable[[Fields], object], fields_says: str, settings_says: str
) -> None:
    with pytest.raises(Bad, match=fields_says):
        read(Fields(LISTS, "doc", Bad))
    with pytest.raises(CoveError, match=settings_says):
        read(Settings(LISTS, "doc", CoveError, source="f"))


def test_lists_hex_and_durations_read_what_is_valid() -> None:
    f = Fields(LISTS, "doc", Bad)
    assert f.strings("s") == ("a", "b") and f.strings("nope", default=()) == ()
    assert [f.duration("d") for f in [Fields({"d": d}, "doc", Bad) for d in LISTS["d"]]] == [30, 2, 90, 0.5, 86400]
    settings = Settings({"x": ["00", " 0f\n"]}, "doc", CoveError, source="f")
    assert settings.hex_list("x") == (b"\x00", b"\x0f")  # a file's pasted digest may carry spaces around it
    with pytest.raises(Bad, match="is not hex"):
        Fields({"x": " 0f"}, "doc", Bad).hex("x")  # a decoded document's may not


# -- every CBOR document Cove reads, with its layer's error ---------------------------------------


def _manifest() -> bytes:
    entries = [Entry("bin", "d", 0o755), Entry("bin/app", "f", 0o755, 3, b"\x01" * 32)]
    return manifest.make({"enclave": {"name": "app"}}, entries).encoded


def _signature() -> bytes:
    return signing.sign(Ed25519PrivateKey.generate(), b"manifest").encode()


def _listing() -> bytes:
    return encode_entries([Entry("a", "f", 0o644, 1, b"\x02" * 32), Entry("l", "l", 0o777, target="a")])


def _header(item: object) -> bytes:
    """A volume root whose clear header is ``item`` (raw CBOR bytes are used as they are)."""
    header = item if isinstance(item, bytes) else cbor2.dumps(item)
    return volume_format.MAGIC + struct.pack("<I", len(header)) + header + bytes(12 + 16)


HEADER = {
    "format": volume_format.FORMAT,
    "id": b"\x01" * 16,
    "label": "v",
    "wrapped": bytes(60),
    "key": {"source": "insecure", "svn": 0},
}


def _open_header(data: bytes) -> object:
    return volume_format.decode_root(data, bytes(16))


def _anchor_record(tmp_path: Path, data: bytes) -> object:
    store = FileAnchor(b"\x01" * 16, b"s" * 16, "/vol")
    store.create()
    store.file.write_bytes(data)
    return store.read()


def _valid_anchor_record(tmp_path: Path) -> bytes:
    store = FileAnchor(b"\x01" * 16, b"s" * 16, "/vol")
    store.create()
    return store.file.read_bytes()


DOCUMENTS: dict[str, tuple[Callable[[bytes], object], type[CoveError]]] = {
    "manifest": (manifest.decode, IntegrityError),
    "signature": (signing.Signature.decode, IntegrityError),
    "listing": (decode_entries, IntegrityError),
    "volume header": (_open_header, VolumeIntegrityError),
    "evidence": (
        lambda data: attest_fields(attest_loads(data, "cove", "evidence"), "cove", "evidence"),
        VerificationError,
    ),
}
VALID = {
    "manifest": _manifest,
    "signature": _signature,
    "listing": _listing,
    "volume header": lambda: _header(HEADER),
    "evidence": lambda: cbor2.dumps({"a": 1}),
}
HOSTILE: dict[str, Callable[[bytes], bytes]] = {
    "trailing bytes": lambda valid: valid + b"\x00",
    "deep nesting": lambda valid: DEEP_CBOR,
    "oversized": lambda valid: b"\x00" * (MAX_DOCUMENT + 1),  # the listing's own limit is lowered to this
    "not CBOR": lambda valid: b"\xff\xff",
    "wrong type": lambda valid: cbor2.dumps([1, 2]),
    "duplicate key": lambda valid: b"\xa2\x61a\x01\x61a\x02",
}


@pytest.fixture(scope="module")
def hostile_inputs() -> dict[tuple[str, str], bytes]:
    out = {}
    for doc, make in VALID.items():
        valid = make()
        for name, mutate in HOSTILE.items():
            data = mutate(valid)
            out[doc, name] = _header(data) if doc == "volume header" else data
    return out


@pytest.mark.parametrize("hostile", list(HOSTILE))
@pytest.mark.parametrize("document", list(DOCUMENTS))
def test_every_document_refuses_hostile_cbor_with_its_layer_error(document, hostile, hostile_inputs, monkeypatch):
    monkeypatch.setattr(tree, "LISTING_LIMIT", MAX_DOCUMENT)
    read, error = DOCUMENTS[document]
    with pytest.raises(error) as caught:
        read(hostile_inputs[document, hostile])
    assert type(caught.value) is error and "\n" not in caught.value.line()


@pytest.mark.parametrize(
    ("document", "change", "fragment"),
    [
        ("manifest", {"extra": 1}, "manifest has an unknown field 'extra'"),
        ("manifest", {"image": {"root": "ab", "files": 1, "bytes": 1}}, "manifest image root must be a byte string"),
        (
            "manifest",
            {"image": {"root": bytes(32), "files": -1, "bytes": 1}},
            "manifest image files must be an integer",
        ),
        ("manifest", {"config": {"enclave": {}}}, "manifest config enclave lacks name"),
        ("manifest", {"launch": {"type": "sev", "measurement": bytes(32)}}, "launch type 'sev' is not one of vm"),
        ("manifest", {"format": "cove-manifest/2"}, "is not cove-manifest/1"),
        ("signature", {"alg": "RSA"}, "manifest signature alg 'RSA' is not one of Ed25519"),
        ("signature", {"sig": bytes(63)}, "manifest signature sig must be 64 bytes, not 63"),
        ("signature", {"key": "k"}, "manifest signature key must be a byte string"),
        ("signature", {"more": 1}, "manifest signature has an unknown field 'more'"),
        ("volume header", {"wrapped": "w"}, "volume root header is incomplete: header wrapped must be a byte string"),
        ("volume header", {"key": {"source": 1, "svn": 0}}, "header key source must be a"),
        ("volume header", {"key": {"source": "insecure", "svn": -1}}, "header key svn must be an integer"),
        ("volume header", {"label": None}, "header label must be a"),
    ],
)
def test_documents_name_the_wrong_field(document, change, fragment):
    read, error = DOCUMENTS[document]
    if document == "volume header":
        data = _header(dict(HEADER, **change))
    else:
        body = cbor2.loads(VALID[document]())
        body.update(change)
        data = cbor2.dumps(body, canonical=True)
    with pytest.raises(error, match=fragment):
        read(data)


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        (["a", "f", 0o644, 1, bytes(32)], "entry must be a list of six items"),
        (["a", "x", 0o644, 1, bytes(32), ""], "entry type 'x' is not one of"),
        (["a", "f", 0o10000, 1, bytes(32), ""], "entry mode must be an integer from 0 to 4095"),
        (["a", "f", 0o644, 1, "digest", ""], "entry digest must be a byte string"),
        ([1, "f", 0o644, 1, bytes(32), ""], "entry path must be a text string"),
        ({"a": 1}, "entry must be a list of six items"),
    ],
)
def test_listing_entries_are_checked(entry, fragment):
    with pytest.raises(IntegrityError, match=fragment):
        decode_entries(cbor2.dumps([entry]))
    with pytest.raises(IntegrityError, match="listing .* must be a list"):
        decode_entries(cbor2.dumps({"a": 1}))


@pytest.fixture
def platform(tmp_path, monkeypatch):
    monkeypatch.setenv("COVE_PLATFORM_DIR", str(tmp_path / "platform"))
    return tmp_path / "platform"


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda valid: valid + b"\x00", "damaged .*trailing bytes"),
        (lambda valid: b"\x81" * 1000 + b"\x00", "damaged .*not valid CBOR"),
        (lambda valid: cbor2.dumps(b"\x00" * (1 << 17)), "damaged .*at most"),
        (lambda valid: b"\xa2\x61a\x01\x61a\x02", "damaged .*not valid CBOR"),
        (lambda valid: cbor2.dumps([1, 2]), "does not belong to this volume or was modified"),
        (lambda valid: cbor2.dumps(dict(cbor2.loads(valid), mac="m")), "does not belong to this volume"),
    ],
)
def test_anchor_record_refuses_hostile_cbor(platform, tmp_path, mutate, fragment):
    valid = _valid_anchor_record(tmp_path)
    with pytest.raises(AnchorError, match=fragment):
        _anchor_record(tmp_path, mutate(valid))


def test_a_hash_cache_of_the_wrong_shape_is_a_miss(tmp_path):
    """Regression: a cache entry that decoded but was not [key, digest] crashed the build (TypeError)."""
    from cove.image import build, instance

    app = instance.create(tmp_path / "app")
    (app.image / "file").write_bytes(b"abc")
    key = tmp_path / "signing.key"
    signing.generate_key(key)
    first = build.build(app, key)
    again = build.build(app, key)  # the cache is read and used: a miss below is the damage's doing
    assert (first.rehashed, again.rehashed, again.cached) == (1, 0, 1)
    cache_file = app.build_dir / build.CACHE
    for damaged in ({"file": 5}, {"file": [1]}, {"file": [[0], "not bytes"]}, [1, 2], b"\xff"):
        cache_file.write_bytes(damaged if isinstance(damaged, bytes) else cbor2.dumps(damaged))
        result = build.build(app, key)
        assert (result.rehashed, result.cached) == (1, 0), damaged
        assert result.manifest.measurement == first.manifest.measurement  # the file hashed anew, rightly


# -- every JSON and TOML document, with its layer's error ---------------------------------------------


def _tcb_info(text: str) -> object:
    from cove.attest.dcap_collateral import parse_tcb_info

    return parse_tcb_info(text)


def _collateral(text: str) -> object:
    from cove.attest.dcap_collateral import parse_collateral

    return parse_collateral(text)


def _policy(text: str) -> object:
    from cove.attest.policy import parse_policy

    return parse_policy(text)


def _config(text: str) -> object:
    from cove.config import parse

    return parse(text)


def _policy_error() -> type[CoveError]:
    from cove.attest.policy import PolicyError

    return PolicyError


TEXT_DOCUMENTS: dict[str, tuple[Callable[[str], object], Callable[[], type[CoveError]]]] = {
    "TCB info": (_tcb_info, lambda: VerificationError),
    "collateral": (_collateral, lambda: VerificationError),
    "policy": (_policy, _policy_error),
    "cove.toml": (_config, lambda: ConfigError),
}
TEXT_HOSTILE: dict[str, str] = {
    "trailing": '{"id": "SGX"} {}',
    "deep JSON": '{"a":' * 100_000,  # a RecursionError in json: a traceback before (policy)
    "deep TOML": "a = " + "[" * 100_000,  # a RecursionError in tomllib: a traceback before (cove.toml)
    "oversized": '{"a": "' + "x" * MAX_DOCUMENT * 4 + '"}',
    "wrong type": "[1, 2]",
    "not text": "\x00\x01",
}


@pytest.mark.parametrize("hostile", list(TEXT_HOSTILE))
@pytest.mark.parametrize("document", list(TEXT_DOCUMENTS))
def test_every_text_document_refuses_hostile_input_with_its_layer_error(document, hostile):
    read, error = TEXT_DOCUMENTS[document]
    with pytest.raises(error()) as caught:
        read(TEXT_HOSTILE[hostile])
    assert "\n" not in caught.value.line()


@pytest.mark.parametrize(
    ("document", "text", "fragment"),
    [
        ("TCB info", '{"id": "SGX", "version": true}', "TCB info version must be an integer"),
        ("TCB info", '{"id": "SGX", "version": 3, "issueDate": 5}', "TCB info issueDate must be a short text string"),
        ("TCB info", '{"id": "SGX", "version": 3}', "TCB info lacks issueDate"),
        ("collateral", '{"tcb_info": 5}', "collateral tcb_info must be str or bytes, not int"),
        ("policy", '[cove]\ndebug = "no"\n', "cove.debug: must be true or false, not 'no'"),
        ("policy", "[freshness]\nnonce = 1\n", "freshness.nonce: must be a string, not int"),
        ("policy", '[[cove.signers]]\nsigner = "00"\nmin_svn = -1\n', "min_svn: -1 is out of range"),
        ("policy", "[snp]\nmin_tcb = {tee = 256}\n", "snp.min_tcb.tee: 256 is out of range"),
        ("cove.toml", '[enclave]\nname = "a"\nsvn = 70000\n', "cove.toml: enclave.svn: 70000 is out of range"),
        ("cove.toml", "[enclave]\nname = 5\n", "cove.toml: enclave.name: must be a string, not int"),
        ("cove.toml", "enclave = 5\n", "cove.toml: enclave: must be a table, not int"),
    ],
)
def test_text_documents_name_the_wrong_field(document, text, fragment):
    read, error = TEXT_DOCUMENTS[document]
    with pytest.raises(error(), match=fragment):
        read(text)


def test_json_text_that_cannot_be_encoded_is_refused_not_raised():
    """A str with a lone surrogate (from os.fsdecode or a decoded body) is malformed JSON, not a crash."""
    with pytest.raises(Bad, match="not valid JSON"):
        decode_json('"\udcff" x', Bad, "doc")
    assert decode_json('"\udcff"', Bad, "doc") == "\udcff"


def test_a_volume_index_that_is_not_a_map_is_an_integrity_error():
    """The sealed index is decoded through cove.decode too (a list there was a crash further on)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from cove.fs.index import KeyPolicy

    kek, vmk, volume_id, policy = bytes(16), b"\x07" * 32, b"\x01" * 16, KeyPolicy("insecure", 0)
    header = dict(HEADER, wrapped=volume_format.wrap_key(kek, vmk, volume_id, "v", policy))
    index = AESGCM(volume_format.kdf(vmk, volume_id, b"index", 32))
    assert volume_format.decode_root(volume_format.encode_root(header, {"tree": 1}, index), kek)[2] == {"tree": 1}
    with pytest.raises(VolumeIntegrityError, match="volume index must be a map"):
        volume_format.decode_root(volume_format.encode_root(header, [1], index), kek)
