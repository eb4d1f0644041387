"""cove.toml: the enclave's configuration, its schema and its validation.

The file is parsed with :mod:`tomllib` and checked against a closed schema:
an unknown key, a wrong type or an out-of-range value is refused with one line
that names the key and the fix. The validated form is a tree of frozen
dataclasses; :func:`to_measured` turns it into the plain dictionary that the
enclave manifest records (so every security-relevant setting is measured).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from cove.decode import Settings, decode_toml
from cove.errors import ConfigError, CoveError

BACKENDS = ("auto", "sim", "vm")
NETWORK_MODES = ("none", "loopback", "host")
MOUNT_TYPES = ("image", "tmpfs", "host", "encrypted")
# Types named by later parts of Cove; refused with a clear line until they land.
RESERVED_MOUNT_TYPES: tuple[str, ...] = ()
ROLLBACK_MODES = ("auto", "tpm", "file", "kbs", "none")
RESERVED_SECTIONS: tuple[str, ...] = ()
SECRET_TARGETS = ("file", "env", "mount")

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
MAX_MEMORY = 64 << 40  # resources.memory: more than any host has, far below what wraps
MAX_ID = 65535  # [process] user UID:GID: the enclave's ids map onto 65536 host ids
# Mount targets the sandbox itself provides: a mount at one (or under /proc, /dev/attestation, /dev/pts) hides it.
SANDBOX_TARGETS = ("/proc", "/dev", "/dev/attestation", "/dev/pts")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_STRING = 1 << 16  # any one string setting; cove.toml itself is at most cove.decode.MAX_DOCUMENT


# Key sources of encrypted mounts and images (resolved to keys by cove.fs.keys).
KEY_SOURCE_KINDS = ("seal", "file", "insecure", "kbs")
SEAL_POLICIES = ("mrenclave", "mrsigner")
_KEY_HEX_RE = re.compile(r"^[0-9a-fA-F]{32}$")
_KBS_RESOURCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


class KeySourceError(CoveError):
    """A key source is malformed, or its key cannot be had."""


@dataclass(frozen=True)
class KeySource:
    kind: str
    arg: str

    @property
    def text(self) -> str:
        return f"{self.kind}:{self.arg}"

    @property
    def sealed(self) -> bool:
        """Whether the key depends on the enclave's identity (and so on an svn)."""
        return self.kind == "seal"

    def __str__(self) -> str:
        return self.text if self.kind != "insecure" else "insecure:<key>"


def parse_key_source(text: str) -> KeySource:
    """Check the syntax of a key source (cove.toml data; resolved by cove.fs.keys); nothing is read."""
    if not isinstance(text, str) or ":" not in text:
        raise KeySourceError(
            f"{text!r} is not a key source",
            "use seal:mrenclave, seal:mrsigner, file:PATH, insecure:HEX or kbs:RESOURCE",
        )
    kind, _, arg = text.partition(":")
    if kind == "seal":
        if arg not in SEAL_POLICIES:
            raise KeySourceError(f"seal:{arg} is not a sealing policy", "use seal:mrenclave or seal:mrsigner")
    elif kind == "file":
        if not arg or "\0" in arg:
            raise KeySourceError("file: needs the path of a key file", "e.g. file:/etc/cove/volume.key")
    elif kind == "insecure":
        if not _KEY_HEX_RE.match(arg):
            raise KeySourceError("insecure: needs 32 hex digits (a 16-byte key)")
    elif kind == "kbs":
        if not _KBS_RESOURCE_RE.match(arg):
            raise KeySourceError(f"kbs:{arg} is not a resource path", "e.g. kbs:default/volume-key/data")
    else:
        raise KeySourceError(f"unknown key source kind {kind!r}", f"use one of {', '.join(KEY_SOURCE_KINDS)}")
    return KeySource(kind, arg)


@dataclass(frozen=True)
class EnclaveSection:
    name: str
    product_id: int = 0
    svn: int = 0
    debug: bool = False
    backend: str = "auto"


@dataclass(frozen=True)
class ResourcesSection:
    memory: int = 512 << 20
    max_processes: int = 64
    max_open_files: int = 1024


@dataclass(frozen=True)
class ProcessSection:
    entry_points: tuple[str, ...] = ("/bin/", "/usr/bin/")
    cwd: str = "/"
    user: str = "root"


@dataclass(frozen=True)
class EnvSection:
    default: tuple[tuple[str, str], ...] = ()
    passthrough: tuple[str, ...] = ()


@dataclass(frozen=True)
class NetworkSection:
    mode: str = "none"


@dataclass(frozen=True)
class SecuritySection:
    """[security]: kernel interfaces the sandbox denies unless the enclave asks (measured)."""

    io_uring: bool = False  # io_uring bypasses per-syscall filtering (e.g. IORING_OP_SOCKET)


@dataclass(frozen=True)
class Mount:
    target: str
    type: str
    source: str | None = None  # host: absolute; encrypted: absolute, or relative to the state folder
    writable: bool = False
    options: tuple[tuple[str, str], ...] = ()
    key: str | None = None  # encrypted: the key source (cove.fs.keys)


@dataclass(frozen=True)
class AttestationSection:
    """[attestation]: the key broker the runtime attests the enclave to before it starts."""

    kbs: str  # the broker's URL
    ca: str | None = None  # the broker's TLS CA certificate (host path); None: the system's CAs
    timeout: int = 30  # seconds per request to the broker
    retries: int = 2  # more tries when the broker cannot be reached (never after a refusal)
    kbs_policy: str | None = None  # an RA-TLS broker: a policy (host path or inline TOML) on its evidence


@dataclass(frozen=True)
class Secret:
    """[[secrets]]: a resource of the broker and where it goes in the enclave."""

    name: str
    resource: str  # repository/type/tag
    target: str  # file:/path (on a tmpfs mount), env:NAME, or mount:/target (an encrypted mount's key)

    @property
    def kind(self) -> str:
        return self.target.partition(":")[0]

    @property
    def where(self) -> str:
        return self.target.partition(":")[2]


@dataclass(frozen=True)
class VmSection:
    """[vm]: the micro-VM of backend = "vm" (docs/backends.md)."""

    vcpus: int = 1
    kernel: str | None = None  # host path of the kernel to boot; None: the newest Debian cloud kernel
    kernel_args: str = ""  # appended to the measured kernel command line
    boot_timeout: int = 60  # seconds from QEMU's start to the program's start
    tpm_device: bool = False  # the VM's vTPM as the guest's /dev/tpm0 (a measured tpm-tis device)


@dataclass(frozen=True)
class Config:
    enclave: EnclaveSection
    resources: ResourcesSection = field(default_factory=ResourcesSection)
    process: ProcessSection = field(default_factory=ProcessSection)
    env: EnvSection = field(default_factory=EnvSection)
    network: NetworkSection = field(default_factory=NetworkSection)
    security: SecuritySection = field(default_factory=SecuritySection)
    mounts: tuple[Mount, ...] = ()
    attestation: AttestationSection | None = None
    secrets: tuple[Secret, ...] = ()
    vm: VmSection = field(default_factory=VmSection)


def host_paths(config: Config, ca_file: bool = True) -> list[str]:
    """Every host path the configuration has the runtime open, as ``setting path``: host mounts' sources,
    encrypted mounts' absolute sources and ``file:`` keys, the broker's CA or policy file, the vm kernel.
    The runtime opens them with the rights of whoever runs it, so a service that runs enclaves as root for
    others (the node daemon for a member of its group, cove-runtime for a container engine) refuses an
    instance that names any (docs/threat-model.md). ``ca_file=False`` leaves out ``[attestation] ca``: a
    node's CA certificate for its broker, which is only checked to be a regular file and parsed as PEM
    (never shown, never followed into other files), is what a cluster's images name."""
    named: list[str] = []
    for index, mount in enumerate(config.mounts):
        if mount.source is not None and (mount.type == "host" or mount.source.startswith("/")):
            named.append(f"mounts[{index}].source {mount.source}")
        if mount.key is not None and mount.key.startswith("file:"):
            named.append(f"mounts[{index}].key {mount.key}")
    attestation = config.attestation
    if attestation is not None:
        if attestation.ca is not None and ca_file:
            named.append(f"attestation.ca {attestation.ca}")
        if attestation.kbs_policy is not None and attestation.kbs_policy.startswith("/"):  # else inline
            named.append(f"attestation.kbs_policy {attestation.kbs_policy}")
    if config.vm.kernel is not None:
        named.append(f"vm.kernel {config.vm.kernel}")
    return named


def load(path: Path) -> Config:
    """Read and validate a cove.toml file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found", "run `cove new NAME` to create an instance") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse(text, source=str(path))


def parse(text: str, source: str = "cove.toml") -> Config:
    """Parse cove.toml text; every problem becomes one ConfigError line."""

    def error(message: str) -> ConfigError:
        return ConfigError(f"{source}: {message}")

    return _Validator(source).config(decode_toml(text, error, ""))


class _Validator:
    """Walks the parsed TOML, refusing anything outside the schema."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, problem: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {problem}", hint)

    # The primitive checks are cove.decode's one accessor, worded for a file people write.

    def fields(self, data: Any, key: str, allowed: tuple[str, ...] | None = None) -> Settings:
        return Settings(data, key, ConfigError, allowed, source=self.source)

    def table(self, data: Any, key: str, allowed: tuple[str, ...]) -> dict:
        self.fields(data, key, allowed)
        return data

    def integer(self, data: dict, key: str, name: str, default: int, low: int, high: int) -> int:
        return self.fields(data, key).integer(name, low, high, default=default)

    def boolean(self, data: dict, key: str, name: str, default: bool) -> bool:
        return self.fields(data, key).boolean(name, default=default)

    def string(
        self, data: dict, key: str, name: str, default: str | None, choices: tuple[str, ...] | None = None
    ) -> str:
        return self.fields(data, key).text(name, choices, max_len=_MAX_STRING, default=default)

    def size(self, data: dict, key: str, name: str, default: int, most: int | None = None) -> int:
        value = data.get(name, default)
        if isinstance(value, bool):
            raise self.fail(f"{key}.{name}", 'must be a size like "512M"')
        if isinstance(value, int):
            number = value
        elif isinstance(value, str):
            match = _SIZE_RE.match(value)
            if not match:
                raise self.fail(
                    f"{key}.{name}",
                    f"{value!r} is not a size",
                    'write bytes or a number with K, M, G or T, e.g. "512M"',
                )
            number = int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
        else:
            raise self.fail(f"{key}.{name}", f'must be a size like "512M", not {type(value).__name__}')
        if number <= 0:
            raise self.fail(f"{key}.{name}", f"must be positive, not {value!r}")
        if most is not None and number > most:
            raise self.fail(f"{key}.{name}", f"{value!r} is more than the largest allowed, {most >> 40}T")
        return number

    def abs_path(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value.startswith("/"):
            raise self.fail(key, f"{value!r} must be an absolute path starting with /")
        if "\0" in value or ".." in PurePosixPath(value).parts:
            raise self.fail(key, f"{value!r} must not contain '..' or NUL")
        return value

    def config(self, data: dict) -> Config:
        self.table(
            data,
            "",
            ("enclave", "resources", "process", "env", "network", "mounts", "attestation", "secrets", "vm", "security")
            + RESERVED_SECTIONS,
        )
        for section in RESERVED_SECTIONS:
            if section in data:
                raise self.fail(section, "is not supported by this version of Cove yet")
        if "enclave" not in data:
            raise self.fail("enclave", "section is required", 'add [enclave] with name = "..."')
        enclave = self.enclave(data["enclave"])
        mounts = self.mounts(data.get("mounts", []), debug=enclave.debug)
        attestation = self.attestation(data["attestation"]) if "attestation" in data else None
        return Config(
            enclave=enclave,
            resources=self.resources(data.get("resources", {})),
            process=self.process(data.get("process", {})),
            env=self.env(data.get("env", {})),
            network=self.network(data.get("network", {})),
            security=self.security(data.get("security", {})),
            mounts=mounts,
            attestation=attestation,
            secrets=self.secrets(data.get("secrets", []), attestation, mounts),
            vm=self.vm(data.get("vm", {})),
        )

    def vm(self, data: Any) -> VmSection:
        data = self.table(data, "vm", ("vcpus", "kernel", "kernel_args", "boot_timeout", "tpm_device"))
        kernel = data.get("kernel")
        if kernel is not None:
            kernel = self.abs_path(kernel, "vm.kernel")
        args = self.string(data, "vm", "kernel_args", "")
        if not re.fullmatch(r"[\x20-\x7e]{0,1024}", args):
            raise self.fail("vm.kernel_args", "must be printable ASCII, at most 1024 characters")
        return VmSection(
            vcpus=self.integer(data, "vm", "vcpus", 1, 1, 16),
            kernel=kernel,
            kernel_args=args,
            boot_timeout=self.integer(data, "vm", "boot_timeout", 60, 1, 3600),
            tpm_device=self.boolean(data, "vm", "tpm_device", False),
        )

    def enclave(self, data: Any) -> EnclaveSection:
        data = self.table(data, "enclave", ("name", "product_id", "svn", "debug", "backend"))
        name = self.string(data, "enclave", "name", None)
        if not _NAME_RE.match(name):
            raise self.fail(
                "enclave.name", f"{name!r} is not a valid name", "use letters, digits, '.', '_' or '-', at most 64"
            )
        return EnclaveSection(
            name=name,
            product_id=self.integer(data, "enclave", "product_id", 0, 0, 0xFFFF),
            svn=self.integer(data, "enclave", "svn", 0, 0, 0xFFFF),
            debug=self.boolean(data, "enclave", "debug", False),
            backend=self.string(data, "enclave", "backend", "auto", BACKENDS),
        )

    def resources(self, data: Any) -> ResourcesSection:
        data = self.table(data, "resources", ("memory", "max_processes", "max_open_files"))
        defaults = ResourcesSection()
        return ResourcesSection(
            memory=self.size(data, "resources", "memory", defaults.memory, MAX_MEMORY),
            max_processes=self.integer(data, "resources", "max_processes", defaults.max_processes, 1, 1 << 22),
            max_open_files=self.integer(data, "resources", "max_open_files", defaults.max_open_files, 16, 1 << 20),
        )

    def process(self, data: Any) -> ProcessSection:
        data = self.table(data, "process", ("entry_points", "cwd", "user"))
        defaults = ProcessSection()
        entry_points = data.get("entry_points", list(defaults.entry_points))
        if not isinstance(entry_points, list) or not entry_points:
            raise self.fail("process.entry_points", "must be a non-empty list of path prefixes")
        checked = tuple(self.abs_path(p, "process.entry_points") for p in entry_points)
        user = self.string(data, "process", "user", defaults.user)
        if not re.match(r"^(root|[a-z_][a-z0-9_-]{0,31}|\d+(:\d+)?)$", user):
            raise self.fail(
                "process.user",
                f"{user!r} is not a user",
                'use "root", a name from the image\'s /etc/passwd, or "UID:GID"',
            )
        if user[0].isdigit() and any(int(part) > MAX_ID for part in user.split(":")):
            raise self.fail(
                "process.user",
                f"{user!r}: ids go up to {MAX_ID}",
                "the enclave's ids map onto a range of 65536 host ids",
            )
        return ProcessSection(
            entry_points=checked,
            cwd=self.abs_path(data.get("cwd", defaults.cwd), "process.cwd"),
            user=user,
        )

    def env(self, data: Any) -> EnvSection:
        data = self.table(data, "env", ("default", "passthrough"))
        default = data.get("default", {})
        if not isinstance(default, dict):
            raise self.fail("env.default", 'must be a table of NAME = "value"')
        for name, value in default.items():
            if not _ENV_NAME_RE.match(name):
                raise self.fail(f"env.default.{name}", "is not a valid variable name")
            if not isinstance(value, str):
                raise self.fail(f"env.default.{name}", "must be a string")
        passthrough = data.get("passthrough", [])
        if not isinstance(passthrough, list) or not all(
            isinstance(n, str) and _ENV_NAME_RE.match(n) for n in passthrough
        ):
            raise self.fail("env.passthrough", "must be a list of variable names")
        return EnvSection(default=tuple(sorted(default.items())), passthrough=tuple(sorted(set(passthrough))))

    def security(self, data: Any) -> SecuritySection:
        data = self.table(data, "security", ("io_uring",))
        return SecuritySection(io_uring=self.boolean(data, "security", "io_uring", False))

    def network(self, data: Any) -> NetworkSection:
        data = self.table(data, "network", ("mode",))
        return NetworkSection(mode=self.string(data, "network", "mode", "none", NETWORK_MODES))

    def mounts(self, data: Any, debug: bool = False) -> tuple[Mount, ...]:
        if not isinstance(data, list):
            raise self.fail("mounts", "must be an array of tables ([[mounts]])")
        result = []
        seen = set()
        sources: dict[str, str] = {}
        for index, item in enumerate(data):
            key = f"mounts[{index}]"
            item = self.table(item, key, ("target", "type", "source", "writable", "options", "key"))
            kind = self.string(item, key, "type", None)
            if kind in RESERVED_MOUNT_TYPES:
                raise self.fail(f"{key}.type", f"{kind!r} mounts are not supported by this version yet")
            if kind not in MOUNT_TYPES:
                raise self.fail(f"{key}.type", f"{kind!r} is not one of {', '.join(MOUNT_TYPES)}")
            target = self.abs_path(item.get("target"), f"{key}.target")
            if target in seen:
                raise self.fail(f"{key}.target", f"{target} is mounted twice")
            seen.add(target)
            if target == "/" and kind != "image":
                raise self.fail(f"{key}.target", "/ is always the measured image")
            covered = next(
                (t for t in SANDBOX_TARGETS if target == t or target.startswith(t.rstrip("/") + "/") and t != "/dev"),
                None,
            )
            if covered is not None:
                raise self.fail(
                    f"{key}.target", f"{target} is where the sandbox provides {covered}", "mount somewhere else"
                )
            source = item.get("source")
            if kind == "host":
                if source is None:
                    raise self.fail(
                        f"{key}.source",
                        "is required for a host mount",
                        'the host folder to mount, e.g. source = "/srv/data"',
                    )
                source = self.abs_path(source, f"{key}.source")
            elif kind == "encrypted":
                source = self.volume_source(source, target, f"{key}.source")
                if source in sources:
                    raise self.fail(
                        f"{key}.source",
                        f"{source!r} is also the volume of {sources[source]}",
                        "give each encrypted mount its own source",
                    )
                sources[source] = target
            elif source is not None:
                raise self.fail(f"{key}.source", "only host and encrypted mounts take a source")
            if "key" in item and kind != "encrypted":
                raise self.fail(f"{key}.key", "only encrypted mounts take a key")
            key_source = self.key_source(item, key, debug) if kind == "encrypted" else None
            writable = self.boolean(item, key, "writable", kind in ("tmpfs", "encrypted"))
            if kind == "image" and writable:
                raise self.fail(f"{key}.writable", "the image is always read-only")
            options = item.get("options", {})
            if not isinstance(options, dict) or not all(isinstance(v, (str, int)) for v in options.values()):
                raise self.fail(f"{key}.options", "must be a table of name = value")
            allowed_options = {"tmpfs": ("size", "mode"), "host": (), "image": (), "encrypted": ("rollback", "cache")}[
                kind
            ]
            for name in options:
                if name not in allowed_options:
                    raise self.fail(
                        f"{key}.options.{name}",
                        "unknown option",
                        f"allowed for {kind}: {', '.join(allowed_options) or 'none'}",
                    )
            if kind == "tmpfs" and "size" in options:
                self.size(options, f"{key}.options", "size", 0)
            if kind == "encrypted":
                self.string(options, f"{key}.options", "rollback", "auto", ROLLBACK_MODES)
                if "cache" in options:
                    self.size(options, f"{key}.options", "cache", 0)
            result.append(
                Mount(
                    target=target,
                    type=kind,
                    source=source,
                    writable=writable,
                    options=tuple(sorted((k, str(v)) for k, v in options.items())),
                    key=key_source,
                )
            )
        return tuple(result)

    def volume_source(self, value: Any, target: str, key: str) -> str:
        """An encrypted mount's host folder: absolute, or relative to the state folder."""
        if value is None:
            value = PurePosixPath(target).name
        if not isinstance(value, str) or not value or "\0" in value:
            raise self.fail(key, f"{value!r} must be a folder: absolute, or relative to the state folder")
        if ".." in PurePosixPath(value).parts:
            raise self.fail(key, f"{value!r} must not contain '..'")
        return value if value.startswith("/") else str(PurePosixPath(value))

    def key_source(self, item: dict, key: str, debug: bool) -> str:
        """An encrypted mount's key source, syntax checked; insecure: only in debug enclaves."""
        text = item.get("key")
        if text is None:
            raise self.fail(
                f"{key}.key",
                "is required for an encrypted mount",
                'e.g. key = "seal:mrsigner" (or seal:mrenclave, file:PATH, kbs:RESOURCE)',
            )
        if not isinstance(text, str):
            raise self.fail(f"{key}.key", f"must be a string, not {type(text).__name__}")
        try:
            source = parse_key_source(text)
        except KeySourceError as exc:
            raise self.fail(f"{key}.key", exc.message, exc.hint) from None
        if source.kind == "insecure" and not debug:
            raise self.fail(
                f"{key}.key",
                "insecure: keys are refused in a non-debug enclave",
                "use seal:mrsigner, seal:mrenclave or kbs:; insecure: is for debug enclaves only",
            )
        if source.kind == "file" and not source.arg.startswith("/"):
            raise self.fail(f"{key}.key", f"file:{source.arg} must be an absolute path")
        return source.text

    def attestation(self, data: Any) -> AttestationSection:
        data = self.table(data, "attestation", ("kbs", "ca", "kbs_policy", "timeout", "retries"))
        url = self.string(data, "attestation", "kbs", None)
        if not re.match(r"^https?://[A-Za-z0-9.\-\[\]:]+(:\d+)?(/[^\s]*)?$", url):
            raise self.fail("attestation.kbs", f"{url!r} is not a broker URL", "e.g. https://kbs.example:8443")
        ca = data.get("ca")
        if ca is not None:
            ca = self.abs_path(ca, "attestation.ca")
        kbs_policy = self.kbs_policy(data, url) if "kbs_policy" in data else None
        if ca is not None and kbs_policy is not None:
            raise self.fail(
                "attestation.kbs_policy",
                "ca and kbs_policy exclude each other",
                "ca for a broker with a CA-issued certificate, kbs_policy for an RA-TLS broker",
            )
        return AttestationSection(
            kbs=url.rstrip("/"),
            ca=ca,
            kbs_policy=kbs_policy,
            timeout=self.integer(data, "attestation", "timeout", 30, 1, 600),
            retries=self.integer(data, "attestation", "retries", 2, 0, 20),
        )

    def kbs_policy(self, data: dict, url: str) -> str:
        """An RA-TLS broker's policy: an absolute host path, or inline TOML/JSON checked here."""
        from cove.attest.policy import PolicyError, is_inline, parse_policy

        value = data["kbs_policy"]
        if not isinstance(value, str) or not value.strip():
            raise self.fail("attestation.kbs_policy", "must be a policy file's path or the policy's text")
        if not url.startswith("https://"):
            raise self.fail(
                "attestation.kbs_policy", "an RA-TLS broker is reached over https://", 'write kbs = "https://..."'
            )
        if not is_inline(value):
            return self.abs_path(value, "attestation.kbs_policy")
        try:
            parse_policy(value, source="attestation.kbs_policy")
        except PolicyError as exc:
            raise ConfigError(f"{self.source}: {exc.message}", exc.hint) from None
        return value

    def secrets(
        self, data: Any, attestation: AttestationSection | None, mounts: tuple[Mount, ...]
    ) -> tuple[Secret, ...]:
        if not isinstance(data, list):
            raise self.fail("secrets", "must be an array of tables ([[secrets]])")
        for index, mount in enumerate(mounts):
            if mount.key and mount.key.startswith("kbs:") and attestation is None:
                raise self.fail(
                    f"mounts[{index}].key",
                    f"{mount.key} needs the key broker",
                    'add [attestation] with kbs = "https://..."',
                )
        if data and attestation is None:
            raise self.fail(
                "secrets", "needs [attestation] with the key broker's URL", 'add [attestation] with kbs = "https://..."'
            )
        result: list[Secret] = []
        names: set[str] = set()
        targets: set[str] = set()
        for index, item in enumerate(data):
            key = f"secrets[{index}]"
            item = self.table(item, key, ("name", "resource", "target"))
            name = self.string(item, key, "name", None)
            if not _NAME_RE.match(name):
                raise self.fail(
                    f"{key}.name", f"{name!r} is not a valid name", "use letters, digits, '.', '_' or '-', at most 64"
                )
            if name in names:
                raise self.fail(f"{key}.name", f"{name!r} is used twice")
            names.add(name)
            resource = self.string(item, key, "resource", None)
            parts = resource.split("/")
            if len(parts) != 3 or not all(re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", p) for p in parts):
                raise self.fail(
                    f"{key}.resource",
                    f"{resource!r} is not a resource path",
                    'write repository/type/tag, e.g. "prod/db/password"',
                )
            target = self.string(item, key, "target", None)
            kind, sep, where = target.partition(":")
            if not sep or kind not in SECRET_TARGETS:
                raise self.fail(
                    f"{key}.target",
                    f"{target!r} is not a target",
                    "use file:/PATH (on a tmpfs mount), env:NAME or mount:/TARGET",
                )
            if kind == "file":
                path = self.abs_path(where, f"{key}.target")
                parent = [m for m in mounts if m.type == "tmpfs" and path.startswith(m.target.rstrip("/") + "/")]
                if not parent:
                    raise self.fail(
                        f"{key}.target",
                        f"{path} is not on a tmpfs mount",
                        "add a [[mounts]] of type tmpfs (e.g. /run/secrets) and put the file there",
                    )
                where = path
            elif kind == "env":
                if not _ENV_NAME_RE.match(where):
                    raise self.fail(f"{key}.target", f"env:{where} is not a variable name")
            else:
                where = self.abs_path(where, f"{key}.target")
                named = next((m for m in mounts if m.target == where), None)
                if named is None or named.type != "encrypted":
                    raise self.fail(f"{key}.target", f"mount:{where} names no encrypted mount")
                if named.key != f"kbs:{resource}":
                    raise self.fail(
                        f"{key}.target",
                        f"the encrypted mount {where} has key {named.key!r}",
                        f'set its key = "kbs:{resource}"',
                    )
            full = f"{kind}:{where}"
            if full in targets:
                raise self.fail(f"{key}.target", f"{full} is the target of two secrets")
            targets.add(full)
            result.append(Secret(name=name, resource=resource, target=full))
        return tuple(result)


def to_measured(config: Config) -> dict:
    """The configuration as the manifest records it: plain types, fixed order."""
    return {
        "enclave": {
            "name": config.enclave.name,
            "product_id": config.enclave.product_id,
            "svn": config.enclave.svn,
            "debug": config.enclave.debug,
            "backend": config.enclave.backend,
        },
        "resources": {
            "memory": config.resources.memory,
            "max_processes": config.resources.max_processes,
            "max_open_files": config.resources.max_open_files,
        },
        "process": {
            "entry_points": list(config.process.entry_points),
            "cwd": config.process.cwd,
            "user": config.process.user,
        },
        "env": {
            "default": dict(config.env.default),
            "passthrough": list(config.env.passthrough),
        },
        "network": {"mode": config.network.mode},
        "mounts": [_measured_mount(m) for m in config.mounts],
        **_measured_attestation(config),
        **_measured_vm(config),
        **_measured_security(config),
    }


def _measured_security(config: Config) -> dict:
    """[security], measured when it differs from the default (older manifests keep their measurement)."""
    if config.security == SecuritySection():
        return {}
    return {"security": {"io_uring": config.security.io_uring}}


def _measured_vm(config: Config) -> dict:
    """[vm], measured only for backend = "vm" (sim manifests keep their measurement).
    The kernel's path is not measured: its bytes are, in the launch measurement."""
    if config.enclave.backend != "vm":
        return {}
    vm = config.vm
    measured = {"vcpus": vm.vcpus, "kernel_args": vm.kernel_args, "boot_timeout": vm.boot_timeout}
    if vm.tpm_device:  # only when set: manifests without it keep their measurement
        measured["tpm_device"] = True
    return {"vm": measured}


def _measured_attestation(config: Config) -> dict:
    """[attestation] and [[secrets]], measured only when present (older manifests stay valid)."""
    measured: dict = {}
    if config.attestation is not None:
        a = config.attestation
        measured["attestation"] = {"kbs": a.kbs, "ca": a.ca, "timeout": a.timeout, "retries": a.retries}
        if a.kbs_policy is not None:  # only when set: manifests without it keep their measurement
            measured["attestation"]["kbs_policy"] = a.kbs_policy
    if config.secrets:
        measured["secrets"] = [{"name": s.name, "resource": s.resource, "target": s.target} for s in config.secrets]
    return measured


def _measured_mount(mount: Mount) -> dict:
    measured = {
        "target": mount.target,
        "type": mount.type,
        "source": mount.source,
        "writable": mount.writable,
        "options": dict(mount.options),
    }
    if mount.key is not None:
        measured["key"] = mount.key
    return measured


def parse_size(text: str) -> int:
    """Parse "64M"-style sizes (used for mount options)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"{text!r} is not a size")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
