"""Encrypted and host mounts of a `vm` enclave: host folders exported into the guest over virtio-fs.

The volume is served exactly as on `sim` (cove.runtime.securefs_mounts: the
same keys, key release, tamper and rollback refusals); this module exports
that server's plaintext view into the guest. One Debian ``virtiofsd`` per
mount speaks vhost-user to QEMU on a socket made here, in the run's private
folder (mode 0600), and handed over already listening, so QEMU can connect
at once. virtiofsd is confined:

- it shares only the FUSE mountpoint of its volume (its working folder when
  it starts, so no host path above it needs to be reachable), and its own
  sandbox (``-o sandbox=namespace``: mount, pid and network namespaces and a
  pivot_root into that folder, plus its built-in seccomp filter) keeps it there;
- it runs in a user namespace of its own whose ids are the enclave's host
  ids (cove.hostids), never host root; the program's own ids are the ones
  the volume stores as 0, the enclave's user, as on `sim` (id_map);
- it dies with the launcher (PR_SET_PDEATHSIG), and its sandbox with it.

A host mount ([[mounts]] type = "host") is the same path with the host
folder itself as the shared view, under sim's rules (check_host_source): it
must exist, a writable one must be writable by the enclave's host user, and
files the guest makes are the enclave's ids on the host. A read-only one is
a read-only bind below virtiofsd (mount_setattr, recursive), so a guest
that remounts its side read-write still cannot write: the host refuses.

Why the host serves the plaintext, not a file system in the guest, is in
docs/threat-model.md ("vm").
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from cove import hostids, util
from cove.errors import CoveError, SetupError

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 1 << 18
VIEW = "/mnt"  # where virtiofsd's mount namespace shows the volume (it pivots its root there)
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 0x1  # x86-64, Linux >= 5.12


def virtiofsd() -> str:
    path = os.environ.get("COVE_VIRTIOFSD", VIRTIOFSD)
    if not os.access(path, os.X_OK):
        raise SetupError(
            f"encrypted mounts on the vm backend need virtiofsd ({path})", "run scripts/setup (qemu-system-x86)"
        )
    return path


@dataclass
class SharedFolder:
    """One running virtiofsd: what QEMU connects to for the virtio-fs device TAG."""

    tag: str
    target: str
    path: Path
    process: subprocess.Popen[bytes]
    qemu_end: socket.socket | None  # already connected: QEMU gets its descriptor (no path length limit)

    def handed_over(self) -> None:
        """QEMU holds its end now; without ours, virtiofsd sees the connection end when QEMU does."""
        if self.qemu_end is not None:
            self.qemu_end.close()
            self.qemu_end = None

    def stop(self, grace: float = 0.0) -> None:
        """Wait up to GRACE seconds for virtiofsd to leave by itself (it does when QEMU is gone), then kill it.

        Its sandboxed child dies with it (virtiofsd's own parent-death signal), which lets the FUSE
        server unmount: the sandbox's mount namespace holds a reference to the volume's mount."""
        self.handed_over()
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.terminate()  # virtiofsd's parent leaves, and its sandbox follows on its death signal
            try:
                self.process.wait(1.0)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        try:
            self.path.unlink()
        except OSError:
            pass


def check_host_source(source: str | None, writable: bool) -> None:
    """Refuse a host mount's source as sim does: missing, or writable by cove.toml but not by the
    enclave's host user (a root-started enclave writes as its subordinate ids, never as root); and
    a file, which virtio-fs cannot share (sim binds one)."""
    if source is None or not os.path.exists(source):  # config requires a source
        raise CoveError(
            f"host mount source {source} does not exist", "create it or remove the mount from cove.toml (and rebuild)"
        )
    if not os.path.isdir(source):
        raise CoveError(
            f"host mount source {source} is not a folder: the vm backend shares folders (virtio-fs)",
            'mount its folder, or use backend = "sim"',
        )
    if not writable:
        return
    if os.geteuid() != 0:  # the enclave runs as the caller
        if os.access(source, os.W_OK | os.X_OK):
            return
        uid, gid = os.getuid(), os.getgid()
    else:
        uid, gid = hostids.enclave_range().host(0, 0)
        st = os.stat(source)
        if st.st_uid == uid:
            allowed = st.st_mode & 0o200
        elif st.st_gid == gid:
            allowed = st.st_mode & 0o020
        else:
            allowed = st.st_mode & 0o002
        if allowed:
            return
    raise CoveError(
        f"host mount source {source} is not writable by the enclave's host user {uid}:{gid} "
        "(enclaves started by root never run as root)",
        f"chown {uid}:{gid} {source}, or make the mount read-only",
    )


def id_map(start: int, count: int, own: int) -> str:
    """A uid_map (or gid_map) for virtiofsd's namespace, whose ids are the guest's: the program's own
    id OWN is host id START, which the volume stores as 0, the enclave's user, as on sim; 0 and OWN
    trade places; every other id N is START + N."""
    if own == 0:
        return f"0 {start} {count}\n"
    lines = [(0, start + own, 1), (own, start, 1)]
    if own > 1:
        lines.append((1, start + 1, own - 1))
    if own + 1 < count:
        lines.append((own + 1, start + own + 1, count - own - 1))
    return "".join(f"{inside} {outside} {length}\n" for inside, outside, length in sorted(lines))


def start(
    tag: str,
    target: str,
    source: Path,
    folder: Path,
    uid: int,
    gid: int,
    read_only: bool = False,
    kind: str = "encrypted",
) -> SharedFolder:
    """Start virtiofsd for the plaintext view mounted at SOURCE (or the host folder SOURCE), for a
    guest program of ids UID:GID; its socket is FOLDER/TAG.sock. KIND names the mount in errors."""
    program = virtiofsd()
    ids = hostids.enclave_range()
    root = os.geteuid() == 0
    if max(uid, gid) >= ids.count:
        raise CoveError(
            f"{kind} mount {target}: the program's ids {uid}:{gid} have no host ids for virtiofsd",
            f'started by a user other than root, a vm enclave with {kind} mounts runs as [process] user = "root"',
        )
    maps = (id_map(ids.uid, ids.count, uid), id_map(ids.gid, ids.count, gid))
    path = folder / f"{tag}.sock"
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    short = f"/proc/self/fd/{folder_fd}/{tag}.sock"  # a run's folder may be deeper than sun_path's 108 bytes
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    qemu_end = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mask = os.umask(0o177)
    try:
        listener.bind(short)
        listener.listen(1)
        qemu_end.connect(short)  # the one connection virtiofsd will take: made before anything else can
    except OSError as exc:
        listener.close()
        qemu_end.close()
        raise CoveError(f"{kind} mount {target}: cannot make virtiofsd's socket: {exc.strerror or exc}") from None
    finally:
        os.umask(mask)
        os.close(folder_fd)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    mapped: list[str] = []
    mapper = threading.Thread(target=_map_ids, args=(ready_r, go_w, maps, mapped), daemon=True)
    mapper.start()
    fd = listener.fileno()
    args = [
        program,
        f"--fd={fd}",
        "-o",
        f"source={VIEW if root else source}",
        "-o",
        "sandbox=namespace",
        "-o",
        "cache=auto",
        "-o",
        "no_posix_lock",
        "-o",
        "no_flock",
        "-o",
        "no_xattr",
        "--rlimit-nofile=0",  # raising it needs CAP_SYS_RESOURCE on the host, which it never has
        "--thread-pool-size=0",
    ]
    errors = open(folder / f"{tag}.err", "wb")
    try:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=errors,
            stderr=errors,
            pass_fds=(fd,),
            close_fds=True,
            start_new_session=True,
            preexec_fn=lambda: _enter(source, ready_w, go_r, root, read_only),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        qemu_end.close()
        raise CoveError(
            f"{kind} mount {target}: virtiofsd did not start ({mapped[0] if mapped else exc})",
            "the vm backend runs virtiofsd in a user namespace of the enclave's ids (cove.hostids)",
        ) from None
    finally:
        errors.close()
        listener.close()
        os.close(ready_w)
        os.close(go_r)
        mapper.join()
        os.close(ready_r)
        os.close(go_w)
    return SharedFolder(tag, target, path, process, qemu_end)


def _enter(source: Path, ready_w: int, go_r: int, root: bool, read_only: bool) -> None:
    """In virtiofsd's process before exec: in a mount namespace of its own, the volume's view at VIEW
    (the host folders above it need not be reachable by the enclave's ids); then the enclave's ids in
    a user namespace of its own (the launcher's thread writes the id maps); it dies with the launcher.
    READ_ONLY: the view is a read-only bind, which virtiofsd's own sandbox cannot make writable."""
    libc = ctypes.CDLL(None, use_errno=True)
    if root:  # another user's folders are that user's own ids in the namespace: reachable as they are
        if libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
        _mount(libc, b"none", b"/", MS_REC | MS_PRIVATE)  # nothing below reaches the host's mounts
        _mount(libc, bytes(source), VIEW.encode(), MS_BIND | MS_REC)
        if read_only:
            _read_only(libc, VIEW.encode())
    if libc.unshare(CLONE_NEWUSER) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
    os.write(ready_w, str(os.getpid()).encode())
    if os.read(go_r, 1) != b"1":
        raise OSError("the id maps were not written")
    if root:  # else setgroups is denied in the namespace, and there are none to drop
        os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    if read_only and not root:  # a mount namespace of the user's own namespace: binds are allowed there
        if libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
        _mount(libc, b"none", b"/", MS_REC | MS_PRIVATE)
        _mount(libc, bytes(source), bytes(source), MS_BIND | MS_REC)
        _read_only(libc, bytes(source))
    util.die_with_parent(signal.SIGKILL)  # after the id change, which clears it


def _mount(libc: ctypes.CDLL, source: bytes, target: bytes, flags: int) -> None:
    if libc.mount(source, target, None, ctypes.c_ulong(flags), None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target.decode()}")


def _read_only(libc: ctypes.CDLL, path: bytes) -> None:
    """Make the bind at PATH and every mount below it read-only (mount_setattr, AT_RECURSIVE)."""
    attr = struct.pack("<QQQQ", MOUNT_ATTR_RDONLY, 0, 0, 0)  # attr_set, attr_clr, propagation, userns_fd
    result = libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(AT_FDCWD),
        ctypes.c_char_p(path),
        ctypes.c_uint(AT_RECURSIVE),
        ctypes.c_char_p(attr),
        ctypes.c_size_t(len(attr)),
    )
    if result != 0:
        raise OSError(ctypes.get_errno(), f"read-only {path.decode()}")


def _map_ids(ready_r: int, go_w: int, maps: tuple[str, str], problems: list[str]) -> None:
    """For the child in _enter: write its namespace's uid and gid maps (id_map)."""
    try:
        pid = int(os.read(ready_r, 32) or b"0")
        if not pid:
            return
        Path(f"/proc/{pid}/uid_map").write_text(maps[0])
        if os.geteuid() != 0:
            Path(f"/proc/{pid}/setgroups").write_text("deny\n")  # required before an unprivileged gid_map
        Path(f"/proc/{pid}/gid_map").write_text(maps[1])
        os.write(go_w, b"1")
    except (OSError, ValueError) as exc:
        problems.append(f"cannot map its ids: {exc}")
        try:
            os.write(go_w, b"0")
        except OSError:
            pass
