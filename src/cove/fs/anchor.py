"""Rollback anchors: where a volume's latest version lives, out of the host's reach.

A volume's root file is authentic (it is encrypted and MACed under the
volume key), but an authentic *old* root is as valid as the current one. The
anchor holds the version and the SHA-256 of the current root; a volume opens
only the root the anchor names. Holding the digest, not just a counter, means
a crash between writing a root and advancing the anchor can never leave two
authentic roots of one version that a host could later choose between.

Stores:

``tpm``   an NV counter and a 40-byte NV index in the platform's TPM
          (tpm2-tools; ``$COVE_TPM_TCTI``, else /dev/tpmrm0). The counter
          survives the index being deleted and redefined (a TPM starts a new
          counter above every counter it ever had), so the version cannot go
          back even for someone holding the TPM's owner authorization.
``file``  a record in the root-only platform folder. A host that can write
          that folder (its root) can roll the record back with the volume.
``none``  no anchor (read-only images, whose content is measured anyway).

Other parts of Cove add stores with :func:`register_store` (the key broker:
``kbs``, holding the version remotely).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import struct
import subprocess
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

import cbor2

from cove.decode import Fields, decode_cbor
from cove.errors import CoveError, SetupError
from cove.util import write_atomic

DIGEST_SIZE = 32
ZERO = bytes(DIGEST_SIZE)
KINDS = ("tpm", "file", "none")
RECORDS = "volumes"
RECORD_LIMIT = 1 << 16  # a platform record holds a volume id, its path and a few numbers


class AnchorError(CoveError):
    """The rollback anchor is missing, unreachable or disagrees with itself."""

    exit_code = 3


@dataclass(frozen=True)
class Anchor:
    version: int
    digest: bytes


class AnchorStore(ABC):
    """The trusted (version, digest) of one volume."""

    kind: str
    guarantee: str

    @abstractmethod
    def create(self) -> Anchor:
        """Set up a new anchor; its first (version, ZERO) state."""

    @abstractmethod
    def read(self) -> Anchor:
        """The current anchor (completing an advance a crash interrupted)."""

    @abstractmethod
    def advance(self, new: Anchor) -> None:
        """Atomically move to ``new`` (its version is the current one + 1)."""

    def params(self) -> dict[str, Any]:
        """What the volume header records to find this anchor again."""
        return {"kind": self.kind}

    def forget(self) -> None:
        """Remove the anchor (when its volume is deliberately discarded)."""


def records_dir() -> Path:
    from cove.platform.root_secret import ensure_private_dir, platform_dir

    return ensure_private_dir(ensure_private_dir(platform_dir()) / RECORDS)


def _record_path(volume_id: bytes, suffix: str) -> Path:
    return records_dir() / f"{volume_id.hex()}.{suffix}"


class NoAnchor(AnchorStore):
    kind = "none"
    guarantee = "none: an older copy of the volume opens without complaint"

    def create(self) -> Anchor:
        return Anchor(0, ZERO)

    def read(self) -> Anchor:  # never consulted
        raise AnchorError("this volume has no rollback anchor")

    def advance(self, new: Anchor) -> None:
        pass


class FileAnchor(AnchorStore):
    """(version, digest) in a MACed record in the platform folder, replaced atomically."""

    kind = "file"
    guarantee = (
        "platform file: detects a volume copied back from a backup or snapshot, "
        "not a host root who also rolls back the platform folder"
    )

    def __init__(self, volume_id: bytes, secret: bytes, path: str):
        self.volume_id = volume_id
        self.secret = secret
        self.path = path

    @property
    def file(self) -> Path:
        return _record_path(self.volume_id, "anchor")

    def _mac(self, body: dict[str, Any]) -> bytes:
        return hmac.new(self.secret, cbor2.dumps(body, canonical=True), "sha256").digest()

    def _write(self, anchor: Anchor, first: int) -> None:
        body = {
            "volume": self.volume_id,
            "path": self.path,
            "kind": self.kind,
            "version": anchor.version,
            "digest": anchor.digest,
            "first": first,
        }
        write_atomic(self.file, cbor2.dumps(dict(body, mac=self._mac(body))), mode=0o600)

    def _load(self) -> dict[str, Any]:
        path = self.file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise AnchorError(
                f"the rollback record of this volume ({path}) is missing",
                "it was deleted, or the volume comes from another platform",
            ) from None
        except OSError as exc:
            raise AnchorError(f"cannot read the rollback record {path}: {exc.strerror}") from None
        record = decode_cbor(data, _damaged(path), "the record", limit=RECORD_LIMIT)
        mac = record.pop("mac", b"") if isinstance(record, dict) else b""
        if (
            not isinstance(record, dict)
            or not isinstance(mac, bytes)
            or not hmac.compare_digest(mac, self._mac(record))
            or record.get("volume") != self.volume_id
        ):
            raise AnchorError(f"the rollback record {self.file} does not belong to this volume or was modified")
        fields = Fields(record, "the record", _damaged(path))
        fields.uint("version"), fields.uint("first"), fields.bytes("digest", 32)
        return record

    def create(self) -> Anchor:
        first = Anchor(1, ZERO)
        self._write(first, first.version)
        return first

    def read(self) -> Anchor:
        record = self._load()
        return Anchor(record["version"], record["digest"])

    def advance(self, new: Anchor) -> None:
        record = self._load()
        if new.version != record["version"] + 1:
            raise AnchorError(f"anchor version {new.version} does not follow {record['version']}")
        self._write(new, record["first"])

    def forget(self) -> None:
        self.file.unlink(missing_ok=True)


def tpm_tcti() -> str | None:
    """The TPM to use: $COVE_TPM_TCTI, else the kernel's resource manager, else None."""
    configured = os.environ.get("COVE_TPM_TCTI")
    if configured:
        return configured
    if os.path.exists("/dev/tpmrm0"):
        return "device:/dev/tpmrm0"
    return None


NV_BASE = 0x01300000  # owner-defined NV index range; two handles per volume
NV_SLOTS = 0x8000


class TpmAnchor(AnchorStore):
    """An NV counter (the version) and an NV index holding (version, digest)."""

    kind = "tpm"
    guarantee = (
        "TPM NV counter: detects any rollback of the volume, including by the host's "
        "root, unless the TPM itself is reset or replaced"
    )

    def __init__(self, volume_id: bytes, secret: bytes, path: str, nv: int | None = None):
        self.volume_id = volume_id
        self.secret = secret
        self.path = path
        tcti = tpm_tcti()
        if tcti is None:
            raise AnchorError(
                "this volume's rollback anchor is in a TPM, and this platform has none",
                "set COVE_TPM_TCTI (e.g. swtpm:port=2321) or use the platform that made it",
            )
        self.tcti: str = tcti
        for tool in ("tpm2_nvdefine", "tpm2_nvread", "tpm2_nvwrite", "tpm2_nvincrement"):
            if shutil.which(tool) is None:
                raise SetupError(f"{tool} is not installed", "run scripts/setup (tpm2-tools)")
        if nv is None:
            slot = int.from_bytes(hashlib.sha256(b"cove nv" + volume_id).digest()[:4], "big")
            nv = NV_BASE + 2 * (slot % (NV_SLOTS // 2))
        self.counter, self.record = nv, nv + 1

    def params(self) -> dict[str, Any]:
        return {"kind": self.kind, "nv": self.counter}

    def _run(self, args: list[str], data: bytes | None = None, owner: bool = False) -> bytes:
        auth = os.memfd_create("cove-nv-auth")
        try:
            os.write(auth, b"hex:" + self.secret.hex().encode())
            env = dict(os.environ, TPM2TOOLS_TCTI=self.tcti)
            if not owner:
                args = args + ["-P", f"file:/proc/self/fd/{auth}"]
            proc = subprocess.run(args, input=data, capture_output=True, env=env, pass_fds=(auth,), timeout=60)
        finally:
            os.close(auth)
        if proc.returncode != 0:
            error = next(
                (
                    line
                    for line in proc.stderr.decode("utf-8", "replace").splitlines()
                    if "ERROR:" in line and "Unable to run" not in line
                ),
                "",
            ).strip()
            raise AnchorError(f"TPM {args[0]} failed: {error or proc.returncode}", f"check the TPM at {self.tcti}")
        return proc.stdout

    def _define(self, handle: int, size: int, counter: bool) -> None:
        attrs = ("nt=counter|" if counter else "") + "ownerread|authread|authwrite|no_da"
        auth = f"hex:{self.secret.hex()}"
        self._run(["tpm2_nvdefine", f"0x{handle:08x}", "-C", "o", "-s", str(size), "-a", attrs, "-p", auth], owner=True)

    def _read_counter(self) -> int:
        raw = self._run(["tpm2_nvread", f"0x{self.counter:08x}", "-C", f"0x{self.counter:08x}", "-s", "8"])
        value: int = struct.unpack(">Q", raw)[0]
        return value

    def _read_record(self) -> Anchor:
        raw = self._run(["tpm2_nvread", f"0x{self.record:08x}", "-C", f"0x{self.record:08x}", "-s", "40"])
        return Anchor(struct.unpack(">Q", raw[:8])[0], raw[8:40])

    def _write_record(self, anchor: Anchor) -> None:
        self._run(
            ["tpm2_nvwrite", f"0x{self.record:08x}", "-C", f"0x{self.record:08x}", "-i", "-"],
            data=struct.pack(">Q", anchor.version) + anchor.digest,
        )

    def _increment(self) -> None:
        self._run(["tpm2_nvincrement", f"0x{self.counter:08x}", "-C", f"0x{self.counter:08x}"])

    def _defined(self) -> set[int]:
        listing = self._run(["tpm2_getcap", "handles-nv-index"], owner=True).decode()
        return {int(word, 16) for word in listing.replace("-", " ").split() if word.startswith("0x")}

    def create(self) -> Anchor:
        taken = self._defined()
        for _ in range(64):  # another volume (or program) may hold this pair: take the next one
            if self.counter not in taken and self.record not in taken:
                break
            nxt = self.counter + 2
            self.counter = nxt if nxt < NV_BASE + NV_SLOTS else NV_BASE
            self.record = self.counter + 1
        else:
            raise AnchorError("no free NV index pair in the TPM", "remove unused volumes with `cove fs forget`")
        self._define(self.counter, 8, counter=True)
        self._define(self.record, 40, counter=False)
        self._increment()  # a counter reads only once written; it starts above every earlier one
        first = Anchor(self._read_counter(), ZERO)
        self._write_record(first)
        write_atomic(
            _record_path(self.volume_id, "tpm"),
            cbor2.dumps(
                {
                    "volume": self.volume_id,
                    "path": self.path,
                    "kind": self.kind,
                    "nv": self.counter,
                    "first": first.version,
                }
            ),
            mode=0o600,
        )
        return first

    def read(self) -> Anchor:
        counter = self._read_counter()
        record = self._read_record()
        if record.version == counter + 1:  # an advance was cut between its two steps
            self._increment()
            counter += 1
        if record.version != counter:
            raise AnchorError(
                f"the TPM record says version {record.version}, its counter {counter}",
                "the NV index was redefined or written outside Cove",
            )
        return record

    def advance(self, new: Anchor) -> None:
        self._write_record(new)
        self._increment()

    def forget(self) -> None:
        for handle in (self.counter, self.record):
            try:
                self._run(["tpm2_nvundefine", f"0x{handle:08x}", "-C", "o"], owner=True)
            except AnchorError:
                pass
        _record_path(self.volume_id, "tpm").unlink(missing_ok=True)


Factory = Callable[..., AnchorStore]
_STORES: dict[str, Factory] = {}


def register_store(kind: str, factory: Factory) -> None:
    """Add an anchor store: ``factory(volume_id, secret, path, **params)`` (the key broker: "kbs")."""
    _STORES[kind] = factory


def choose_kind(requested: str) -> str:
    """``auto`` is the TPM when the platform has one, else the platform file."""
    if requested != "auto":
        return requested
    return "tpm" if tpm_tcti() is not None else "file"


def open_store(params: dict[str, Any], volume_id: bytes, secret: bytes, path: str) -> AnchorStore:
    """The store a volume header names (``{"kind": ..., ...}``)."""
    params = dict(params)
    kind = params.pop("kind", None)
    if kind == "none":
        return NoAnchor()
    if kind == "file":
        return FileAnchor(volume_id, secret, path)
    if kind == "tpm":
        return TpmAnchor(volume_id, secret, path, params.get("nv"))
    if kind in _STORES:
        return _STORES[kind](volume_id, secret, path, **params)
    raise AnchorError(
        f"rollback anchor kind {kind!r} is not available here",
        "kbs anchors need the key broker client" if kind == "kbs" else None,
    )


def known_volume_at(path: str) -> dict[str, object] | None:
    """A platform record of a volume at ``path`` that had commits beyond its first, if any.

    Lets a mount refuse to start afresh where a volume was deleted.
    """
    directory = records_dir()
    for entry in sorted(directory.iterdir()):
        if entry.suffix not in (".anchor", ".tpm"):
            continue
        record = _platform_record(entry)
        if record is None or record.get("path") != path:
            continue
        version = record.get("version")
        if record.get("kind") == "tpm":
            version = _tpm_owner_read(record.get("nv"))
        first = record.get("first", 0)
        if not isinstance(version, int) or not isinstance(first, int) or version > first + 1:
            return dict(record, record=str(entry), current=version)
    return None


def forget_records(path: str) -> list[str]:
    """Remove the platform's anchors of volumes at ``path`` (they are being discarded)."""
    removed = []
    for entry in sorted(records_dir().iterdir()):
        record = _platform_record(entry)
        if record is not None and record.get("path") == path:
            nv = record.get("nv")
            tcti = tpm_tcti() if record.get("kind") == "tpm" else None
            if tcti and isinstance(nv, int):
                for handle in (nv, nv + 1):
                    subprocess.run(
                        ["tpm2_nvundefine", f"0x{handle:08x}", "-C", "o"],
                        capture_output=True,
                        env=dict(os.environ, TPM2TOOLS_TCTI=tcti),
                    )
            entry.unlink()
            removed.append(str(entry))
    return removed


def _platform_record(entry: Path) -> dict[str, object] | None:
    """A platform record file's map, or None if it cannot be read or decoded (it is someone else's)."""
    try:
        record = decode_cbor(entry.read_bytes(), _Unreadable, "the record", limit=RECORD_LIMIT)
    except (OSError, _Unreadable):
        return None
    if not isinstance(record, dict):
        return None
    return {key: value for key, value in record.items() if isinstance(key, str)}


class _Unreadable(Exception):
    """A platform record that is not Cove's: skipped while scanning."""


def _damaged(path: Path) -> Callable[[str], AnchorError]:
    def error(message: str) -> AnchorError:
        return AnchorError(f"the rollback record {path} is damaged ({message})")

    return error


def _tpm_owner_read(nv: object) -> int | None:
    """A volume's TPM counter, read with the owner's (empty) authorization; None if unreadable."""
    tcti = tpm_tcti()
    if tcti is None or not isinstance(nv, int):
        return None
    proc = subprocess.run(
        ["tpm2_nvread", f"0x{nv:08x}", "-C", "o", "-s", "8"],
        capture_output=True,
        env=dict(os.environ, TPM2TOOLS_TCTI=tcti),
    )
    if proc.returncode != 0 or len(proc.stdout) != 8:
        return None
    value: int = struct.unpack(">Q", proc.stdout)[0]
    return value
