"""Reading a bundle's config.json: what Cove's sandbox honours, and one line for what it cannot.

The enclave's own measured configuration (cove.toml in the signed build)
decides its user, working folder, limits, mounts and network; the OCI
process may ask only for what agrees with it. What an engine adds for every
container (/proc, /dev, /sys, its /etc/hosts and friends) is provided by the
sandbox itself or not at all; anything else a bundle asks for that would
widen the enclave (privileged, the host's PID namespace, added capabilities,
devices, host folders, a mount over /dev/attestation) is refused with the
field named. Format notes: docs/formats/oci.md.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cove.decode import decode_json
from cove.errors import CoveError, NotFoundError
from cove.image.paths import resolve_in_image
from cove.oci import DOMAIN

OCI_VERSION = re.compile(r"1\.[0-9]+\.[0-9]+(-[0-9A-Za-z.+-]+)?")
# Docker's default set (containerd, CRI); Podman's is a subset. Anything else is "added".
DEFAULT_CAPABILITIES = frozenset(
    {
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    }
)
# Mounts every engine adds; the sandbox provides its own /proc, /dev and /tmp and no /sys at all.
ENGINE_TYPES = frozenset({"proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2", "tmpfs", "shm"})
ENGINE_FILES = frozenset(
    {
        "/etc/hosts",
        "/etc/hostname",
        "/etc/resolv.conf",
        "/run/.containerenv",
        "/dev/shm",
        "/dev/termination-log",
        "/run/secrets",
        "/dev/init",
    }
)
RLIMITS = frozenset(
    {
        "RLIMIT_AS",
        "RLIMIT_CORE",
        "RLIMIT_CPU",
        "RLIMIT_DATA",
        "RLIMIT_FSIZE",
        "RLIMIT_LOCKS",
        "RLIMIT_MEMLOCK",
        "RLIMIT_MSGQUEUE",
        "RLIMIT_NICE",
        "RLIMIT_NOFILE",
        "RLIMIT_NPROC",
        "RLIMIT_RSS",
        "RLIMIT_RTPRIO",
        "RLIMIT_RTTIME",
        "RLIMIT_SIGPENDING",
        "RLIMIT_STACK",
    }
)
UNMEASURED_DEBUG = f"{DOMAIN}/unmeasured-debug"
MAX_CONFIG = 4 << 20  # runc reads any size; an engine's config.json is a few KiB
PRIVILEGED_ANNOTATIONS = ("io.podman.annotations.privileged",)


class BundleError(CoveError):
    """config.json asks for something malformed or for what Cove cannot honour (exit 2)."""


@dataclass(frozen=True)
class Process:
    args: tuple[str, ...]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    terminal: bool
    rlimits: tuple[tuple[str, int, int], ...] = ()


@dataclass(frozen=True)
class Bundle:
    path: Path
    rootfs: Path
    process: Process
    annotations: dict[str, str] = field(default_factory=dict)
    cgroups_path: str | None = None  # linux.cgroupsPath: the container's cgroup (cove.oci.cgroups)
    memory_limit: int | None = None  # linux.resources.memory.limit, bytes
    pids_limit: int | None = None  # linux.resources.pids.limit

    @property
    def unmeasured_debug(self) -> bool:
        return self.annotations.get(UNMEASURED_DEBUG, "").lower() == "true"


def _get(
    data: dict[str, Any], key: str, kind: type, where: str, default: Any = None, source: str = "config.json"
) -> Any:
    value = data.get(key, default)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BundleError(f"{source}: {where}{key} must be a {kind.__name__}")
    if isinstance(value, str) and "\0" in value:
        raise BundleError(f"{source}: {where}{key} holds a NUL character")
    return value


def read_document(path: Path | str, what: str, limit: int) -> dict[str, Any]:
    """A JSON object an engine wrote (config.json, process.json), read through cove.decode.

    Too large, malformed, nested too deep, followed by more text or not an
    object is one BundleError line naming WHAT; a missing file is the
    caller's FileNotFoundError (it names what was asked for).
    """
    with open(path, "rb") as handle:
        text = handle.read(limit + 1)
    if len(text) > limit:
        raise BundleError(f"{what} is larger than {limit >> 20} MiB")
    data = decode_json(text, BundleError, what, limit=limit)
    if not isinstance(data, dict):
        raise BundleError(f"{what} must hold a JSON object")
    return data


def _strings(value: object) -> bool:
    return isinstance(value, str) and "\0" not in value


def load(bundle: Path) -> Bundle:
    """Read and check a bundle; one BundleError line for anything wrong."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise NotFoundError(f"bundle {bundle} is not a folder")
    try:
        data = read_document(bundle / "config.json", "config.json", MAX_CONFIG)
    except FileNotFoundError:
        raise NotFoundError(f"bundle {bundle} has no config.json") from None
    version = data.get("ociVersion")
    if not isinstance(version, str) or not OCI_VERSION.fullmatch(version):
        raise BundleError(f"config.json: ociVersion {version!r} is not a runtime-spec version 1.x this runtime knows")
    annotations = _get(data, "annotations", dict, "", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        raise BundleError("config.json: annotations must map strings to strings")
    for name in PRIVILEGED_ANNOTATIONS:
        if annotations.get(name, "").upper() == "TRUE":
            raise BundleError(f"config.json: annotations.{name}: a privileged container cannot be an enclave")
    linux = _get(data, "linux", dict, "", {})
    _check_linux(linux)
    _check_mounts(_get(data, "mounts", list, "", []))
    resources = _get(linux, "resources", dict, "linux.", {})
    memory = _get(_get(resources, "memory", dict, "linux.resources.", {}), "limit", int, "linux.resources.memory.")
    pids = _get(_get(resources, "pids", dict, "linux.resources.", {}), "limit", int, "linux.resources.pids.")
    return Bundle(
        bundle,
        _rootfs(bundle, _get(data, "root", dict, "", {})),
        _process(_get(data, "process", dict, "", None)),
        annotations,
        _get(linux, "cgroupsPath", str, "linux.") or None,
        memory,
        pids,
    )


def _rootfs(bundle: Path, root: dict[str, Any]) -> Path:
    path = _get(root, "path", str, "root.", None)
    if not path:
        raise BundleError("config.json: root.path is missing")
    if os.path.isabs(path):
        found = Path(path)
    else:
        base = bundle.resolve()
        found = (bundle / path).resolve()
        if found != base and base not in found.parents:
            raise BundleError(f"config.json: root.path {path!r} leads out of the bundle (to {found})")
    if not found.is_dir():
        raise NotFoundError(f"config.json: root.path {path!r} is not a folder")
    return found


def _process(process: dict[str, Any] | None) -> Process:
    if process is None:
        raise BundleError("config.json: process is missing (cove-runtime starts one program per container)")
    return parse_process(process, "config.json")


def parse_process(process: dict[str, Any], source: str) -> Process:
    """A process object: config.json's `process`, or the process.json `exec` reads; errors name source."""
    where = "process." if source == "config.json" else ""
    args = _get(process, "args", list, where, [], source)
    if not args or not all(_strings(a) for a in args):
        raise BundleError(f"{source}: {where}args must be a non-empty list of strings (without NUL)")
    env: dict[str, str] = {}
    for item in _get(process, "env", list, where, [], source):
        if not _strings(item) or "=" not in item:
            raise BundleError(f"{source}: {where}env entry {item!r} is not NAME=VALUE")
        name, _, value = item.partition("=")
        env[name] = value
    cwd = _get(process, "cwd", str, where, "/", source)
    if not cwd.startswith("/"):
        raise BundleError(f"{source}: {where}cwd {cwd!r} must be absolute")
    user = _get(process, "user", dict, where, {}, source)
    uid = _get(user, "uid", int, f"{where}user.", 0, source)
    gid = _get(user, "gid", int, f"{where}user.", 0, source)
    caps = _get(process, "capabilities", dict, where, {}, source)
    for kind, names in caps.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BundleError(f"{source}: {where}capabilities.{kind} must be a list of names")
        added = sorted(set(names) - DEFAULT_CAPABILITIES)
        if added:
            raise BundleError(
                f"{source}: {where}capabilities.{kind} adds {', '.join(added)}: an enclave "
                "runs with every capability dropped"
            )
    limits: list[tuple[str, int, int]] = []
    for item in _get(process, "rlimits", list, where, [], source):
        entry = item if isinstance(item, dict) else {}
        kind, soft, hard = entry.get("type"), entry.get("soft"), entry.get("hard")
        if (
            not (isinstance(kind, str) and kind in RLIMITS and isinstance(soft, int) and isinstance(hard, int))
            or isinstance(soft, bool)
            or isinstance(hard, bool)
            or soft < 0
            or hard < 0
        ):
            raise BundleError(f"{source}: {where}rlimits entry {str(item)[:80]} is not a known limit")
        limits.append((kind, soft, hard))
    return Process(
        tuple(args),
        env,
        posixpath.normpath(cwd),
        uid,
        gid,
        bool(_get(process, "terminal", bool, where, False, source)),
        tuple(limits),
    )


def program_path(process: Process, root: Path | None, source: str) -> str:
    """args[0] as a normalised absolute path in the image: PATH searched inside ROOT, as runc does.

    What is checked against the entry points is what runs: a relative path
    with a "/" is refused (the kernel would resolve it against the working
    folder, ".." included), and a PATH hit is normalised before it is
    returned. ROOT None (an encrypted root) finds absolute paths only.
    """
    where = "process." if source == "config.json" else ""
    program = process.args[0]
    if program.startswith("/"):
        return posixpath.normpath(program)
    if "/" in program:
        raise BundleError(
            f"{source}: {where}args[0] {program!r} is a relative path",
            "give the program's absolute path, or a name found in PATH",
        )
    if root is not None:
        for folder in process.env.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":"):
            if folder.startswith("/"):
                candidate = posixpath.normpath(posixpath.join(folder, program))
                if resolve_in_image(root, candidate, follow_last=True).is_file():
                    return candidate
    raise BundleError(
        f"{source}: {where}args[0] {program!r} is not in the image's PATH", "give the program's absolute path"
    )


def _check_linux(linux: dict[str, Any]) -> None:
    namespaces = _get(linux, "namespaces", list, "linux.", None)
    if namespaces is not None:
        pid = [n for n in namespaces if isinstance(n, dict) and n.get("type") == "pid"]
        if not pid or pid[0].get("path"):
            raise BundleError(
                "config.json: linux.namespaces: the host's (or another container's) PID namespace "
                "cannot be shared with an enclave"
            )
    if _get(linux, "devices", list, "linux.", []):
        raise BundleError("config.json: linux.devices: devices cannot be passed into an enclave")
    masked = _get(linux, "maskedPaths", list, "linux.", None)
    if linux.get("seccomp") is None and namespaces is not None and masked == []:
        raise BundleError(
            "config.json: linux.maskedPaths is empty and linux.seccomp absent: a privileged "
            "container cannot be an enclave"
        )


def _check_mounts(mounts: list[Any]) -> None:
    for index, mount in enumerate(mounts):
        if not isinstance(mount, dict) or not isinstance(mount.get("destination"), str):
            raise BundleError(f"config.json: mounts[{index}] has no destination")
        target = posixpath.normpath("/" + mount["destination"].lstrip("/"))
        if target == "/dev/attestation" or target.startswith("/dev/attestation/"):
            raise BundleError(
                f"config.json: mounts[{index}].destination {mount['destination']}: "
                "/dev/attestation is Cove's and cannot be mounted over"
            )
        if target.startswith("/.cove"):
            raise BundleError(f"config.json: mounts[{index}].destination {mount['destination']}: /.cove is Cove's")
        kind = mount.get("type") or ""
        if not isinstance(kind, str):
            raise BundleError(f"config.json: mounts[{index}].type must be a string")
        if kind in ENGINE_TYPES or target in ENGINE_FILES:
            continue  # the sandbox provides its own (or none): the engine's is not used
        raise BundleError(
            f"config.json: mounts[{index}] ({kind or 'bind'} at {target}): host folders reach an "
            "enclave only as measured [[mounts]] in cove.toml"
        )
