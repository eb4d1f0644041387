"""/dev/attestation for every enclave of the node, from one process (``python -m cove.daemon.attestation``).

The daemon starts this server once, detached like a supervisor, so enclaves
keep their /dev/attestation when the daemon is killed or upgraded. It loads
the platform key (and opens the TPM) once, mounts one FUSE file system and
gives each enclave a folder of its own in it, named by the enclave's
instance id, holding the same files as a per-run server
(cove.platform.devattest). An enclave's supervisor registers the enclave's
identity, taken from the verified manifest, over a root-only control socket
and binds only that folder at /dev/attestation; no other folder is visible
in the enclave. As a second wall, the first process of another pid
namespace that touches a folder binds it to that namespace, and any other
namespace is refused (EACCES) from then on; in the server's own namespace
only root (or the server's own user) may look. An enclave holds at most
MAX_HANDLES open files (EMFILE past that), so one busy enclave cannot grow
the server for every other.

Control protocol (one JSON object per line, answered by one line): see
docs/formats/daemon-api.md.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

from cove.decode import Fields, decode_json
from cove.runtime.enclave_services import Bind, EnclaveService, ServiceContext

STRIDE = 1 << 16  # inodes per enclave folder
TARGET = "/dev/attestation"
MAX_CONTROL = 1 << 17  # a control message: the reader stops past 64 KiB, so at most one more chunk
CONTROL: str | None = None  # set by the supervisor: the control socket of the node's server
MAX_HANDLES = 128  # open files per enclave folder


def request(control: str, message: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """One control request; the server's answer (raises OSError when it is not there or not an object)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(control)
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = decode_json(data or b"{}", OSError, "the attestation server's answer")
    if not isinstance(answer, dict):
        raise OSError("the attestation server answered something that is not an object")
    return answer


class SharedAttestation(EnclaveService):
    """The enclave's folder in the node's attestation server, bound at /dev/attestation."""

    def __init__(self, control: str):
        self.control = control
        self.instance_id: str | None = None

    def start(self, ctx: ServiceContext) -> list[Bind]:
        from cove.errors import CoveError
        from cove.runtime.attestation_service import identity_json

        try:
            answer = request(
                self.control,
                {
                    "op": "register",
                    "instance_id": ctx.instance_id,
                    "identity": json.loads(identity_json(ctx)),
                    "owner": os.getpid(),  # for a server started before owners were read from SO_PEERCRED
                },
            )
        except (OSError, ValueError) as exc:
            raise CoveError(
                f"the node's /dev/attestation server is not answering ({exc})", "restart `cove daemon`"
            ) from None
        if not answer.get("ok"):
            raise CoveError(f"the node's /dev/attestation server refused the enclave: {answer.get('error')}")
        self.instance_id = ctx.instance_id
        if answer.get("none"):
            print(f"cove: warning: /dev/attestation cannot quote: {answer['none']}", file=sys.stderr, flush=True)
        return [Bind(Path(answer["path"]), TARGET, writable=True)]

    def stop(self) -> None:
        if self.instance_id is not None:
            try:
                request(self.control, {"op": "unregister", "instance_id": self.instance_id}, timeout=10)
            except (OSError, ValueError):
                pass  # the server drops folders whose supervisor is gone
            self.instance_id = None


def services(ctx: ServiceContext) -> list[EnclaveService]:
    """Replaces cove.runtime.attestation_service:services in a supervisor: the node's server, not a process per run."""
    if CONTROL is None:
        from cove.runtime.attestation_service import services as per_run

        return per_run(ctx)
    return [SharedAttestation(CONTROL)]


# -- the server (runs in its own process)


def _pid_namespace(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def _fsuid(pid: int) -> int | None:
    """The file-system uid the process acts with (the one the kernel checks its access as)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Uid:"):
                    return int(line.split()[4])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peer_pid(connection: socket.socket) -> int:
    """The connecting process, as the kernel names it in this pid namespace (SO_PEERCRED)."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid: int = struct.unpack("3i", credentials)[0]
    return pid


def serve(mountpoint: Path, control: Path) -> int:
    import gc

    from cove import hostids, util
    from cove.errors import CoveError
    from cove.platform import devattest, monitor
    from cove.platform.devattest import ROOT, Attr, AttestationFs, FuseError
    from cove.platform.devattest_server import claims_from_json, sealing_keys

    own_namespace = _pid_namespace(os.getpid())
    own_uid = os.geteuid()
    try:
        signer = monitor.signer()  # the platform key and the TPM: loaded once for every enclave
        why_none = None
    except CoveError as exc:
        signer, why_none = None, exc.line()
    owner_ids = hostids.enclave_range().host(0, 0) if os.geteuid() == 0 else (os.getuid(), os.getgid())

    class Slot:
        def __init__(self, index: int, name: str, fs: AttestationFs, owner: int):
            self.index, self.name, self.fs, self.owner = index, name, fs, owner
            self.namespace: int | None = None
            self.open = 0  # handles held, against MAX_HANDLES

    class NodeFs:
        """The root lists enclave folders (root only); each folder is one enclave's AttestationFs."""

        def __init__(self) -> None:
            self.slots: dict[int, Slot] = {}
            self.by_name: dict[str, int] = {}
            self.handles: dict[int, tuple[int, int]] = {}
            self.next_index = 1
            self.next_fh = 1
            self.started = time.time_ns()
            self.requests: dict[str, int] = {}  # quote and report reads by outcome (metrics)

        # registrations, from the control thread (single assignments: safe beside the FUSE loop)
        def register(self, name: str, identity: dict[str, Any], owner: int) -> dict[str, Any]:
            if not name or "/" in name or name.startswith(".") or len(name) > 64:
                return {"ok": False, "error": "bad instance id"}
            if name in self.by_name:
                return {"ok": False, "error": "instance id already registered"}
            claims = claims_from_json(identity)
            if signer is None:
                fs = AttestationFs("none", None, None, sealing_keys(claims))
            else:
                fs = AttestationFs(
                    "cove",
                    functools.partial(signer.evidence, claims),
                    functools.partial(signer.signed_report, claims),
                    sealing_keys(claims),
                )
            fs.uid, fs.gid = owner_ids
            index = self.next_index
            self.next_index += 1
            self.slots[index] = Slot(index, name, fs, owner)
            self.by_name[name] = index
            return {"ok": True, "path": str(mountpoint / name), "none": why_none}

        def unregister(self, name: str) -> dict[str, Any]:
            index = self.by_name.pop(name, None)
            if index is not None:
                self.slots.pop(index, None)
            return {"ok": True}

        def reap(self) -> None:
            """Drop the folders of enclaves whose supervisor died without unregistering."""
            for name, index in list(self.by_name.items()):
                slot = self.slots.get(index)
                if slot is not None and not os.path.exists(f"/proc/{slot.owner}"):
                    self.unregister(name)

        # inode arithmetic
        def _slot(self, inode: int, pid: int = 0) -> tuple[Slot, int]:
            slot = self.slots.get(inode // STRIDE)
            if slot is None:
                raise FuseError(errno.ENOENT)
            if pid:
                namespace = _pid_namespace(pid)
                if namespace is None:
                    raise FuseError(errno.EACCES)
                if namespace != own_namespace:
                    if slot.namespace is None:
                        slot.namespace = namespace  # the enclave's first touch
                    elif slot.namespace != namespace:
                        raise FuseError(errno.EACCES)  # another enclave: never
                elif _fsuid(pid) not in (0, own_uid):  # a host process: root or the server's user, whatever the modes
                    raise FuseError(errno.EACCES)
            return slot, inode % STRIDE

        @staticmethod
        def _global(slot: Slot, attrs: Attr) -> Attr:
            return attrs._replace(inode=slot.index * STRIDE + attrs.inode)

        def _root_attrs(self) -> Attr:
            return Attr(ROOT, stat.S_IFDIR | 0o711, 0, 0, 0, self.started, timeout=0)

        def getattr(self, inode: int, pid: int = 0) -> Attr:
            if inode == ROOT:
                return self._root_attrs()
            slot, local = self._slot(inode, pid)
            return self._global(slot, slot.fs.getattr(local))

        def lookup(self, parent: int, name: bytes, pid: int = 0) -> Attr:
            if parent == ROOT:
                index = self.by_name.get(name.decode(errors="replace"))
                if index is None:
                    raise FuseError(errno.ENOENT)
                slot, _ = self._slot(index * STRIDE + ROOT, pid)
                return self._global(slot, slot.fs.getattr(ROOT))
            slot, local = self._slot(parent, pid)
            return self._global(slot, slot.fs.lookup(local, name))

        def opendir(self, inode: int, pid: int = 0) -> int:
            if inode != ROOT:
                slot, local = self._slot(inode, pid)
                slot.fs.opendir(local)
            return inode

        def readdir(self, fh: int, start: int) -> list[tuple[int, Attr, bytes]]:
            if fh == ROOT:
                entries = sorted(self.slots.values(), key=lambda s: s.index)
                return [
                    (slot.index, self._global(slot, slot.fs.getattr(ROOT)), slot.name.encode())
                    for slot in entries
                    if slot.index > start
                ]
            slot, local = self._slot(fh)
            return [(cookie, self._global(slot, attrs), name) for cookie, attrs, name in slot.fs.readdir(local, start)]

        def open(self, inode: int, flags: int, pid: int = 0) -> int:
            try:
                slot, local = self._slot(inode, pid)
            except FuseError:
                self.requests["refused"] = self.requests.get("refused", 0) + 1
                raise
            if slot.open >= MAX_HANDLES:
                raise FuseError(errno.EMFILE)
            node = slot.fs.nodes.get(local)
            counted = node is not None and node.name in (b"quote", b"report")
            try:
                local_fh = slot.fs.open(local, flags)
            except FuseError:
                if counted:
                    self.requests["error"] = self.requests.get("error", 0) + 1
                raise
            if counted:
                self.requests["ok"] = self.requests.get("ok", 0) + 1
            fh = self.next_fh
            self.next_fh += 1
            self.handles[fh] = (slot.index, local_fh)
            slot.open += 1
            return fh

        def _handle(self, fh: int) -> tuple[Slot, int]:
            index, local = self.handles.get(fh, (0, 0))
            slot = self.slots.get(index)
            if slot is None:
                raise FuseError(errno.EBADF)
            return slot, local

        def read(self, fh: int, off: int, size: int) -> bytes:
            slot, local = self._handle(fh)
            return slot.fs.read(local, off, size)

        def write(self, fh: int, off: int, data: bytes) -> int:
            slot, local = self._handle(fh)
            return slot.fs.write(local, off, data)

        def flush(self, fh: int) -> None:
            slot, local = self._handle(fh)
            slot.fs.flush(local)

        def release(self, fh: int) -> None:
            index, local = self.handles.pop(fh, (0, 0))
            slot = self.slots.get(index)
            if slot is not None:
                slot.open -= 1
                slot.fs.release(local)

        def setattr(self, inode: int, valid: int, size: int, pid: int = 0) -> Attr:
            slot, local = self._slot(inode, pid)
            return self._global(slot, slot.fs.setattr(local, valid, size))

    fs = NodeFs()
    listener = _listen(control)
    bound = os.stat(control).st_ino

    def control_loop() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                try:
                    connection.settimeout(10)
                    data = b""
                    while not data.endswith(b"\n") and len(data) < 65536:
                        chunk = connection.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    message = Fields(
                        decode_json(data, ValueError, "control message", limit=MAX_CONTROL),
                        "control message",
                        ValueError,
                    )
                    op = message.text("op")
                    if op == "register":
                        identity = cast(dict[str, Any], message.value("identity", dict))
                        # the owner is the connecting supervisor, as the kernel names it here; an "owner" the
                        # message may still carry is ignored (a pid from another namespace means nothing here)
                        answer = fs.register(message.text("instance_id"), identity, _peer_pid(connection))
                    elif op == "unregister":
                        answer = fs.unregister(message.text("instance_id"))
                    elif op == "status":
                        answer = {
                            "ok": True,
                            "enclaves": len(fs.slots),
                            "pid": os.getpid(),
                            "none": why_none,
                            "requests": dict(fs.requests),
                        }
                    else:
                        answer = {"ok": False, "error": "unknown op"}
                    fs.reap()
                except (ValueError, KeyError, TypeError, OSError) as exc:
                    answer = {"ok": False, "error": type(exc).__name__}
                try:
                    connection.sendall(json.dumps(answer).encode() + b"\n")
                except OSError:
                    pass

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    signal.signal(signal.SIGINT, leave)
    devattest.unmount(str(mountpoint))  # left by a server that died (ensure_server lets only one start)
    mountpoint.mkdir(mode=0o700, parents=True, exist_ok=True)
    # root lets the enclaves' host ids in; a user's server is reached by that user's enclaves without it (and
    # fusermount3 refuses allow_other to users unless /etc/fuse.conf says user_allow_other)
    fd = devattest.mount(str(mountpoint), allow_other=own_uid == 0)
    gc.freeze()  # the key, the modules: nothing the collector need look at again
    watcher = None
    try:
        print("ready", flush=True)
        # the mount goes when this process has wholly gone, however it ends (kill -9, the OOM killer), not only
        # by the finally below; without a watcher, one line on stderr and the enclaves are served all the same
        watcher = util.watch_mount(str(mountpoint), "the node's /dev/attestation")
        # then the control socket: a server that answers is watched, and the fork above saw no other thread
        threading.Thread(target=control_loop, daemon=True).start()
        devattest.serve(fd, fs)
    finally:
        devattest.unmount(str(mountpoint))
        if watcher is not None:
            watcher.release()  # unmounted: not the watcher's to detach any more (if it is still there, it stays)
        os.close(fd)
        listener.close()
        try:
            if os.stat(control).st_ino == bound:  # never another server's socket, bound at the same path since
                os.unlink(control)
        except FileNotFoundError:
            pass
    return 0


def _listen(path: Path) -> socket.socket:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(256)
    return listener


def ensure_server(root: Path, timeout: float = 30.0) -> str:
    """The control socket of the node's attestation server, started (detached) if it is not answering."""
    control = root / "attestation.sock"
    lock = os.open(root / "attestation.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the check and the spawn as one: a second server would displace the first
        return _ensure_locked(root, control, timeout)
    finally:
        os.close(lock)


def _ensure_locked(root: Path, control: Path, timeout: float) -> str:
    try:
        if request(str(control), {"op": "status"}, timeout=5).get("ok"):
            return str(control)
    except (OSError, ValueError):
        pass
    log = open(root / "attestation.log", "ab")
    try:
        subprocess.Popen(
            [sys.executable, "-m", "cove.daemon.attestation", str(root / "attestation"), str(control)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        ).wait()  # it forks away at once, as a supervisor does
    finally:
        log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if request(str(control), {"op": "status"}, timeout=5).get("ok"):
                return str(control)
        except (OSError, ValueError):
            time.sleep(0.02)
    raise OSError(errno.ETIMEDOUT, "the node's /dev/attestation server did not start", str(root / "attestation.log"))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python -m cove.daemon.attestation MOUNTPOINT CONTROL_SOCKET", file=sys.stderr)
        sys.exit(2)
    if os.fork():
        os._exit(0)
    sys.exit(serve(Path(sys.argv[1]), Path(sys.argv[2])))
