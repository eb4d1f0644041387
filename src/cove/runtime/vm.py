"""The `vm` backend: the enclave as a measured QEMU micro-VM with its own kernel.

The launcher hands over a verified build; this module copies the kernel and
initramfs of build/vm into the run's private folder while hashing them, and
boots nothing unless they, the command line and the VM's size hash to the
launch measurement in the signed manifest (cove.image.vmimage). QEMU runs a
`microvm` machine with direct kernel boot; four virtio-serial ports carry the
launch request and signals (cove.ctl) and the program's stdin, stdout and
stderr. Cove's guest init (src/cove/guest/init.c) starts the program and
reports its exit code on cove.ctl. Encrypted mounts are the host's secure
file system server's plaintext views, and host mounts host folders, each
exported over virtio-fs by a confined virtiofsd (cove.runtime.vm_shared); so is
the root of a build made with --encrypt-image, the verifying view of its
ciphertext. A debug run at the user's terminal gets a terminal in the guest.
KVM is used when a probe boot shows that /dev/kvm boots this kernel;
otherwise TCG, and the isolation level says so.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from cove import util
from cove.config import parse_size
from cove.decode import Fields, decode_json
from cove.errors import CoveError, SetupError
from cove.image import vmimage
from cove.runtime.backend import Availability, Backend, LaunchSpec, RunningEnclave, find_tool

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from cove.attest.evidence import VtpmQuote
    from cove.platform.reports import EnclaveClaims, ReportSigner
    from cove.platform.sealing import Identity
    from cove.runtime.vm_shared import SharedFolder
    from cove.runtime.vm_tpmdev import TpmDevice
    from cove.runtime.vm_vtpm import Vtpm, VtpmQuoter

NAME = "vm"
ACCEL_CACHE = 1 << 20  # bytes of accel.json: one short entry per kernel and QEMU probed
KVM, TCG = "vm (kvm)", "vm (tcg, emulated)"
PROBE_TIMEOUT = 10.0  # a kernel that KVM boots answers in well under a second
EXIT_GRACE = 10.0  # seconds for the guest to power off after it reported the exit code
EXEC_SOCKET = "exec.sock"  # in the run's vm folder while the program runs: `cove exec` through the node
MAX_EXEC_ARGS = 64 << 10  # bytes of a `cove exec` program's arguments (the guest's line is twice that in hex)
EXEC_REQUEST_TIMEOUT = 30.0  # seconds a `cove exec` client may take to send its request line
SHARED_GRACE = 2.0  # seconds virtiofsd gets to leave by itself once QEMU is gone
EXEC_QUEUE_BYTES = 2 << 20  # bytes of lines queued for one client: the guest's output window and last drain fit
EXEC_IN_WINDOW = 64 << 10  # bytes of input sent ahead of what the guest wrote to the program (init.c's)
EXEC_INPUT_LINE = 2 * 4096 + 2  # "i<hex of at most 4 KiB>\n", the longest line a client sends after its request
GUEST_LINE = 160 << 10  # bytes of the longest cove.ctl line the guest may send (init.c's MAX_LINE): longer ends the run


def qemu() -> str:
    path = find_tool("qemu-system-x86_64")
    if path is None:
        raise SetupError("qemu-system-x86_64 is not installed", "run scripts/setup (qemu-system-x86)")
    return path


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cove" / "vm"


def qemu_arguments(
    description: dict,
    kernel: Path,
    initrd: Path,
    accel: str,
    console: Path,
    port_fds: list[int],
    shared: dict[str, int] | None = None,
    tpm: int | None = None,
) -> list[str]:
    """The QEMU command line for a checked launch description; port_fds follow vmimage.PORTS;
    shared: QEMU's connected end of each encrypted mount's vhost-user socket (vm_shared), by tag;
    tpm: QEMU's end of the vTPM's control channel (vm_tpmdev) when the description has the device."""
    kvm = accel == "kvm"
    shared = shared or {}
    args = [
        qemu(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-machine",
        f"{description['machine']},x-option-roms=off" + (",memory-backend=mem" if shared else ""),
        "-accel",
        accel,
        "-cpu",
        "host" if kvm else "max",
        "-smp",
        str(description["vcpus"]),
        "-m",
        f"{description['memory'] >> 20}M",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        description["cmdline"],
        "-chardev",
        f"file,id=console,path={console}",
        "-serial",
        "chardev:console",
        "-device",
        f"{_virtio_device(description, 'virtio-serial') or 'virtio-serial-device'},max_ports={len(vmimage.PORTS) + 1}",
    ]
    if net := _virtio_device(description, "virtio-net"):
        args += ["-netdev", "user,id=net0,restrict=off", "-device", f"{net},netdev=net0"]
    args += _shared_arguments(description, shared)
    if vmimage.tpm_device(description):
        if tpm is None:
            raise CoveError("this vm build has a TPM device, but the run has no vTPM to attach")
        args += [
            "-chardev",
            f"socket,id=tpm,fd={tpm}",
            "-tpmdev",
            "emulator,id=tpm0,chardev=tpm",
            "-device",
            "tpm-tis,tpmdev=tpm0",
        ]
    for index, (name, fd) in enumerate(zip(vmimage.PORTS, port_fds)):
        args += [
            "-chardev",
            f"socket,id=port{index},fd={fd}",
            "-device",
            f"virtserialport,chardev=port{index},name={name},nr={index + 1}",
        ]
    return args


def _virtio_device(description: dict, kind: str) -> str | None:
    """The QEMU device for KIND ("virtio-serial", "virtio-net") as the measured description names it:
    KIND-pci (modern virtio only) on microvm's PCIe bus, or KIND-device (virtio-mmio) in older builds."""
    for device in description.get("devices", ()):
        name = device.split(":", 1)[0]
        if name == f"{kind}-pci":
            return f"{name},disable-legacy=on"
        if name == f"{kind}-device":
            return name
    return None


def _shared_arguments(description: dict, shared: dict[str, int]) -> list[str]:
    """virtio-fs devices for the encrypted mounts the measured description names (vm_shared serves them),
    on guest RAM that virtiofsd can map: a shared memfd."""
    if not shared:
        return []
    args = ["-object", f"memory-backend-memfd,id=mem,size={description['memory'] >> 20}M,share=on"]
    for device in description.get("devices", ()):
        if device.startswith(vmimage.FS_DEVICE):
            tag = device[len(vmimage.FS_DEVICE) :].split(":", 1)[0]
            args += [
                "-chardev",
                f"socket,id={tag},fd={shared[tag]}",
                "-device",
                f"vhost-user-fs-pci,chardev={tag},tag={tag}",  # virtio 1.0 only, as libvhost-user requires
            ]
    return args


def encode_request(
    spec: LaunchSpec,
    attestation_type: str,
    files: Sequence[tuple[str, bytes]] = (),
    keys: bytes = b"",
    root_tag: str = "",
    terminal: tuple[int, int] | None = None,
) -> bytes:
    """The launch request for the guest init (docs/formats/vm-guest.md): NUL-terminated typed items.
    ``files`` are written read-only into the guest's tmpfs mounts before the program starts; ``keys``
    (the mrenclave then the mrsigner sealing key, sealing_keys) become /dev/attestation/keys/;
    ``root_tag``: the root is that virtio-fs tag (an encrypted image's view), not the initramfs's;
    ``terminal``: (rows, cols) of a terminal the guest gives the program (--debug-enclave at the user's)."""
    config = spec.config
    items = [f"A{a}" for a in spec.argv]
    items += [f"E{k}={v}" for k, v in spec.env.items()]
    items += [f"I{entry}" for entry in config.process.entry_points] + (["D"] if config.enclave.debug else [])
    items += [
        f"U{spec.uid}",
        f"G{spec.gid}",
        f"C{config.process.cwd}",
        f"H{config.enclave.name}",
        f"N{config.network.mode}",
        f"P{config.resources.max_processes}",
        f"F{config.resources.max_open_files}",
        f"Y{attestation_type}",
    ]
    for mount in config.mounts:
        if mount.type == "tmpfs":
            options = dict(mount.options)
            size = str(parse_size(options["size"])) if "size" in options else ""
            items.append(f"T{size}:{options.get('mode', '1777')}:{mount.target}")
        elif mount.type in ("encrypted", "host"):  # both over virtio-fs (vm_shared)
            tag = shared_tags(config)[mount.target]
            items.append(f"V{'rw' if mount.writable else 'ro'}:{tag}:{mount.target}")
        elif mount.type != "image":
            raise CoveError(
                f"a {mount.type} mount ({mount.target}) is not available on the vm backend yet",
                'use backend = "sim" for it, or remove the mount',
            )
    items += [f"W{data.hex()}:{target}" for target, data in files]
    items += [f"K{keys.hex()}"] if keys else []
    items += [f"O{root_tag}"] if root_tag else []
    items += [f"M{terminal[0]}:{terminal[1]}"] if terminal else []
    mask = caller_umask()
    items += [f"B{mask:o}"] if mask != 0o022 else []  # 022 is the init's own: older builds' inits know no B
    body = b"".join(item.encode() + b"\0" for item in items)
    for item in items:
        if "\0" in item:
            raise CoveError("arguments and environment must not contain NUL bytes")
    if len(body) > 1 << 20:
        raise CoveError("the program's arguments and environment exceed 1 MiB")
    return struct.pack("<I", len(body)) + body


def caller_umask() -> int:
    """This process's umask, read without changing it (os.umask would, for a moment, in every thread:
    the launcher's threads set 0177 around the sockets they make)."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def shared_tags(config) -> dict[str, str]:
    """The virtio-fs tag of each encrypted or host mount, by target (vmimage names them in the build)."""
    return {target: tag for tag, _, target in vmimage.shared_folders(config)}


class SerialPorts:
    """Socket pairs for the virtio-serial ports: QEMU gets one end of each."""

    def __init__(self):
        self.pairs = [socket.socketpair() for _ in vmimage.PORTS]

    def guest_fds(self) -> list[int]:
        return [pair[1].fileno() for pair in self.pairs]

    def host(self, name: str) -> socket.socket:
        return self.pairs[vmimage.PORTS.index(name)][0]

    def close_guest_ends(self) -> None:
        for pair in self.pairs:
            pair[1].close()

    def close(self) -> None:
        for pair in self.pairs:
            for end in pair:
                end.close()


def _boot(
    description: dict,
    kernel: Path,
    initrd: Path,
    accel: str,
    workdir: Path,
    ports: SerialPorts,
    shared: dict[str, int] | None = None,
    tpm: int | None = None,
) -> subprocess.Popen:
    console = workdir / "console.log"
    args = qemu_arguments(description, kernel, initrd, accel, console, ports.guest_fds(), shared, tpm)
    errors = open(workdir / "qemu.err", "wb")
    try:
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=errors,
            stderr=errors,
            pass_fds=ports.guest_fds() + list((shared or {}).values()) + ([tpm] if tpm is not None else []),
            close_fds=True,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    finally:
        errors.close()
        ports.close_guest_ends()


def _die_with_parent() -> None:
    """In QEMU's process before exec: SIGKILL when `cove run` dies, even by SIGKILL itself."""
    util.die_with_parent(signal.SIGKILL)


def number(text: str, digits: int) -> int | None:
    """TEXT's value if it is 1 to DIGITS ASCII digits, else None: a guest's numbers are parsed with
    this, never str.isdigit(), which also takes '²' (that int() then refuses)."""
    return int(text) if re.fullmatch(f"[0-9]{{1,{digits}}}", text) else None


def control_lines(sock: socket.socket) -> Iterator[bytes]:
    """The guest's cove.ctl lines, without their newline, until the port ends. A line longer than
    GUEST_LINE raises CoveError: the guest is broken or hostile, and the launcher holds no more
    of it than that (each byte is scanned once)."""
    buffer = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:
            return
        if not chunk:
            return
        scanned = len(buffer)
        buffer += chunk
        while (end := buffer.find(b"\n", scanned)) >= 0:
            if end > GUEST_LINE:
                break
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            scanned = 0
            yield line
        if len(buffer) > GUEST_LINE:
            raise CoveError(f"the vm guest sent a control line longer than {GUEST_LINE} bytes; the run is ended")


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def serve_attestation(
    sock: socket.socket, makers: dict[bytes, Callable[[EnclaveClaims, bytes], bytes]], claims: EnclaveClaims
) -> None:
    """Answer the guest's /dev/attestation on cove.attest until it closes: its kind (Q quote, R report)
    and 64 bytes of report data in, evidence or the signed report out (length first); an unknown kind
    gets length 0. Only the report data comes from the guest; the claims are the verified manifest's."""
    while True:
        data = b""
        try:
            while len(data) < 65:
                chunk = sock.recv(65 - len(data))
                if not chunk:
                    return
                data += chunk
            make = makers.get(data[:1])
            try:
                answer = make(claims, data[1:]) if make is not None else b""
            except Exception:  # a failed signature: the reader gets nothing, the enclave goes on
                answer = b""
            sock.sendall(struct.pack("<I", len(answer)) + answer)
        except OSError:
            return


class VmEnclave(RunningEnclave):
    def __init__(
        self,
        spec: LaunchSpec,
        isolation: str,
        process: subprocess.Popen,
        ports: SerialPorts,
        workdir: Path,
        started: float,
        signer=None,
        vtpm: Vtpm | None = None,
        ready: Callable[[], VtpmQuoter | None] = lambda: None,
        request: bytes = b"",
        shared: Sequence[SharedFolder] = (),
    ):
        super().__init__(spec, NAME, isolation)
        self.shared = list(shared)  # the encrypted mounts' virtiofsd, stopped once QEMU is gone
        self._terminal: list | None = None  # the user's terminal's settings while it is raw (own_terminal)
        self._previous_winch: Callable | int | None = None
        self.vtpm = vtpm
        self.host_error: str | None = None
        self.process = process
        self.ports = ports
        self.workdir = workdir
        self.launched_at = started
        self.ready_at: float | None = None
        self.exit_code: int | None = None
        self.guest_error: str | None = None
        self._ready = threading.Event()
        self._ended = threading.Event()
        self._requested = threading.Event()  # the launch request is sent: other cove.ctl lines may follow
        self._ctl_lock = threading.Lock()
        self._held_signals: list[int] | None = []  # signals before the program runs; None once it does
        self._execs: dict[int, _ExecSession] = {}
        self._exec_lock = threading.Lock()
        self._exec_next = 0
        self._listener: socket.socket | None = None
        self._threads = [
            threading.Thread(target=self._control, daemon=True),
            threading.Thread(target=self._pump_out, args=(ports.host("cove.stdout"), 1), daemon=True),
            threading.Thread(target=self._pump_out, args=(ports.host("cove.stderr"), 2), daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        threading.Thread(target=self._pump_in, args=(ports.host("cove.stdin"),), daemon=True).start()
        threading.Thread(target=self._start_guest, args=(signer, ready, request), daemon=True).start()

    def own_terminal(self) -> None:
        """--debug-enclave at the user's terminal: the guest gives the program a terminal of its own
        (the launch request's M item), so the user's becomes a raw byte pipe to it until the end, and
        its size follows the user's (a `T<rows>:<cols>` line at each SIGWINCH). Main thread only."""
        import termios
        import tty

        self._terminal = termios.tcgetattr(0)
        tty.setraw(0, termios.TCSANOW)
        resized = threading.Event()  # the handler only flags it: a send from it could split another line
        self._previous_winch = signal.signal(signal.SIGWINCH, lambda *_: resized.set())
        threading.Thread(target=self._follow_size, args=(resized,), daemon=True).start()

    def _follow_size(self, resized: threading.Event) -> None:
        while not self._ended.is_set():
            if resized.wait(0.5):
                resized.clear()
                self._send_size()

    def _send_size(self) -> None:
        """The user's terminal's size to the guest, never before the launch request (the init reads
        that first; a line ahead of it would be taken for its length)."""
        if self._requested.is_set() and (size := user_terminal_size()) is not None:
            self._to_guest(b"T%d:%d\n" % size)

    def _release_terminal(self) -> None:
        saved, self._terminal = self._terminal, None
        if saved is not None:
            import termios

            try:
                termios.tcsetattr(0, termios.TCSADRAIN, saved)
            except termios.error:
                pass  # the terminal is gone
            signal.signal(signal.SIGWINCH, self._previous_winch or signal.SIG_DFL)

    def _start_guest(self, signer: ReportSigner | None, ready: Callable[[], VtpmQuoter | None], request: bytes) -> None:
        """While the kernel boots: wait for the vTPM's launch PCR to be extended, then send the
        launch request. The guest init waits for the request, so no program runs before it."""
        try:
            quoter = ready()
        except CoveError as exc:
            self.host_error = exc.line()
            self.process.kill()
            return
        if signer is not None:
            from cove.platform.reports import EnclaveClaims  # only vm runs pay for this import

            spec = self.spec
            claims = EnclaveClaims(
                spec.identity.measurement,
                spec.identity.signer,
                spec.identity.product_id,
                spec.identity.svn,
                spec.identity.debug,
                NAME,
                self.isolation,
                spec.instance_id,
            )
            makers = {b"Q": functools.partial(signer.evidence, vtpm=quoter), b"R": signer.signed_report}
            threading.Thread(
                target=serve_attestation, args=(self.ports.host("cove.attest"), makers, claims), daemon=True
            ).start()
        try:
            with self._ctl_lock:
                self.ports.host("cove.ctl").sendall(request)
        except OSError:
            pass  # QEMU is gone; wait() reports it
        self._requested.set()
        if self._terminal is not None:
            self._send_size()  # the user's terminal may have changed size since the M item was made

    def _control(self) -> None:
        """The guest's lines (docs/backends.md); one that does not parse is dropped, one too long ends the run."""
        try:
            for line in control_lines(self.ports.host("cove.ctl")):
                self._message(line.decode("utf-8", "replace"))
        except CoveError as exc:
            self.host_error = exc.line()
            self.process.kill()
        self._ready.set()
        self._ended.set()
        self._close_execs()

    def _message(self, line: str) -> None:
        if line == "R" and self.ready_at is None:
            self.ready_at = time.monotonic()
            self._ready.set()
            with self._ctl_lock:  # the program's namespace relays signals now: send the ones held
                held, self._held_signals = self._held_signals or [], None
                for signum in held:
                    self._send_ctl(f"S{signum}\n".encode())
            self._listen_exec()
        elif line[:1] in ("o", "e", "x", "r", "i") and (ident := number(line[1:].partition(":")[0], 10)) is not None:
            self._exec_message(ident, line)
        elif line.startswith("X") and (code := number(line[1:], 3)) is not None:
            self.exit_code = min(code, 255)  # the guest is not trusted with more than a byte
            self._ended.set()
            self._close_execs()
        elif line.startswith("E"):
            self.guest_error = "".join(c if c.isprintable() else "?" for c in line[1:301])
            self._ready.set()
            self._ended.set()

    def _listen_exec(self) -> None:
        """Once the program runs: accept `cove exec` requests (cove.runtime.vm_exec) on EXEC_SOCKET."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mask = os.umask(0o177)
        try:
            listener.bind(str(self.workdir / EXEC_SOCKET))
        except OSError:
            listener.close()
            return  # no exec for this enclave; the program runs on
        finally:
            os.umask(mask)
        listener.listen(8)
        self._listener = listener
        threading.Thread(target=self._accept_exec, args=(listener,), daemon=True).start()

    def _accept_exec(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._exec_session, args=(conn,), daemon=True).start()

    def _exec_session(self, conn: socket.socket) -> None:
        """One `cove exec`: a JSON line {"argv": [...], "stdin", "tty", "rows", "cols"} in, then input and
        window-size lines; the guest's lines for it out (docs/backends.md)."""
        with conn:
            _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid not in (0, os.getuid()):
                return
            conn.settimeout(EXEC_REQUEST_TIMEOUT)
            reader = conn.makefile("rb")
            try:
                line = reader.readline(MAX_EXEC_ARGS * 2)
                request = Fields(
                    decode_json(line, ValueError, "exec request", limit=MAX_EXEC_ARGS * 2),
                    "exec request",
                    ValueError,
                    ("argv", "stdin", "tty", "rows", "cols"),
                )
                argv = request.value("argv", list)
                if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                    raise ValueError("argv")
                args = b"".join(a.encode() + b"\0" for a in argv)
                if not argv or "\0" in "".join(argv) or len(args) > MAX_EXEC_ARGS:
                    raise ValueError("argv")
                stdin, tty = request.boolean("stdin", False), request.boolean("tty", False)
                rows, cols = request.integer("rows", 0, 0xFFFF, 24), request.integer("cols", 0, 0xFFFF, 80)
            except (OSError, ValueError, TypeError, KeyError, AttributeError):
                _send(conn, b"r0:malformed exec request\n")
                return
            conn.settimeout(None)  # from here the guest's window bounds what waits for a slow client
            session = _ExecSession(stdin or tty)
            with self._exec_lock:
                if self._listener is None:
                    _send(conn, b"r0:the program has ended\n")
                    return
                self._exec_next += 1
                ident = self._exec_next
                self._execs[ident] = session
            mode = b"" if not session.input else b".%s.%d.%d" % (b"t" if tty else b"i", rows, cols)
            try:
                self._relay_exec(conn, reader, b"x%d%s:%s\n" % (ident, mode, args.hex().encode()), ident, session)
            finally:
                session.over()
                with self._exec_lock:
                    self._execs.pop(ident, None)
                try:
                    conn.shutdown(socket.SHUT_RDWR)  # the input thread's reader holds the socket open
                except OSError:
                    pass

    def _relay_exec(
        self, conn: socket.socket, reader: BinaryIO, request: bytes, ident: int, session: _ExecSession
    ) -> None:
        """Send the request, then the guest's lines for it to the client (here, never on the control
        thread), acknowledging each o/e line once the client took it; the client's input and window
        sizes go the other way on a thread of their own. Unless the guest ended the request (an `x`
        or `r` line), `k<id>` kills what it started."""
        finished = not self._to_guest(request)
        if not finished:
            threading.Thread(target=self._exec_input, args=(reader, ident, session), daemon=True).start()
        while not finished:
            if session.overflow.is_set() or session.left.is_set():
                break  # a guest past its window, or the client left
            try:
                line = session.take(0.2)
            except queue.Empty:
                continue
            if not _send(conn, line):
                break  # the client is gone
            finished = line[:1] in (b"x", b"r")
            if line[:1] in (b"o", b"e"):
                self._to_guest(b"a%d:%d\n" % (ident, len(line)))
        if not finished:
            self._to_guest(b"k%d\n" % ident)

    def _exec_input(self, reader: BinaryIO, ident: int, session: _ExecSession) -> None:
        """The client's lines after its request: `i<hex>` input (`i` alone: its end) and `w<rows>:<cols>`,
        passed to the guest within its input window; dropped without -i or -t. The end of the
        connection, or a malformed line, is the client leaving."""
        while True:
            try:
                line = reader.readline(EXEC_INPUT_LINE + 1)
            except (OSError, ValueError):
                line = b""
            data = exec_client_input(line)
            if data is None:
                session.left.set()
                reader.close()
                return
            if not session.input:
                continue
            if line[:1] == b"w":
                self._to_guest(b"w%d:%s\n" % (ident, line[1:].rstrip(b"\n")))
            elif session.reserve(len(data)):
                self._to_guest(b"i%d:%s\n" % (ident, data.hex().encode()))
            else:
                reader.close()
                return  # the session is over

    def _to_guest(self, line: bytes) -> bool:
        with self._ctl_lock:
            return self._send_ctl(line)

    def _exec_message(self, ident: int, line: str) -> None:
        """On the control thread: queue the line for its session's thread, never wait for a client;
        the guest's acknowledgements of input return the session's input window."""
        with self._exec_lock:
            session = self._execs.get(ident)
        if session is None:
            return
        if line[:1] == "i":
            if (written := number(line.partition(":")[2], 8)) is not None:
                session.acked(written)
        else:
            session.offer(line.encode() + b"\n")

    def _close_execs(self) -> None:
        """The program ended (and so did every program `cove exec` started): no more exec."""
        with self._exec_lock:
            listener, self._listener = self._listener, None
            sessions, self._execs = list(self._execs.values()), {}
        if listener is not None:
            listener.close()
            try:
                os.unlink(self.workdir / EXEC_SOCKET)
            except OSError:
                pass
        for session in sessions:
            session.offer(b"r0:the enclave's program ended\n")

    @staticmethod
    def _pump_out(sock: socket.socket, fd: int) -> None:
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            view = memoryview(chunk)
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except OSError:
                    return

    @staticmethod
    def _pump_in(sock: socket.socket) -> None:
        try:
            while chunk := os.read(0, 65536):
                sock.sendall(chunk)
        except OSError:
            pass
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def signal(self, signum: int) -> None:
        """Relay a signal to the program. Before it runs it is held: a line ahead of the launch request
        would be read as the request's length, and the guest's namespace ignores signals until its
        handlers are set, so a SIGTERM in the first second of a boot would be lost."""
        with self._ctl_lock:
            if self._held_signals is not None:
                self._held_signals.append(signum)
            else:
                self._send_ctl(f"S{signum}\n".encode())

    def _send_ctl(self, line: bytes) -> bool:
        """One line on cove.ctl; the caller holds _ctl_lock. False: QEMU is gone (wait() reports it)."""
        try:
            self.ports.host("cove.ctl").sendall(line)
            return True
        except OSError:
            return False

    def wait(self) -> int:
        timeout = self.spec.config.vm.boot_timeout
        if not self._ready.wait(timeout) and self.process.poll() is None:
            self.stop()
            raise CoveError(
                f"the vm did not start the program within {timeout} s (guest console: "
                f"{_last_line(self.workdir / 'console.log') or 'empty'})",
                "raise [vm] boot_timeout, or check [vm] kernel and kernel_args",
            )
        while not self._ended.wait(0.2):
            if self.process.poll() is not None:
                self._ended.wait(1)  # the last message may still be in the socket
                break
        if self.exit_code is not None:
            try:
                self.process.wait(EXIT_GRACE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        else:
            self.stop()
        self._stop_shared(SHARED_GRACE)
        for thread in self._threads[1:]:
            thread.join(timeout=5)
        self._record_timing()
        if self.host_error:
            raise CoveError(self.host_error)
        if self.guest_error:
            raise CoveError(f"the vm's init failed: {self.guest_error}")
        if self.exit_code is None:
            status = self.process.returncode
            reason = _last_line(self.workdir / "qemu.err") or _last_line(self.workdir / "console.log")
            if "vhost" in reason:  # an encrypted mount's virtiofsd failed: its own last words say why
                reason += "".join(
                    f"; virtiofsd: {line}" for e in sorted(self.workdir.glob("cove-*.err")) if (line := _last_line(e))
                )
            raise CoveError(
                f"the vm ended without the program's exit code (QEMU exit status {status}"
                + (f": {reason}" if reason else "")
                + ")"
            )
        return self.exit_code

    def _record_timing(self) -> None:
        """For bench/startup.py: seconds from QEMU's start to the program's exec, as a JSON line."""
        path = os.environ.get("COVE_VM_TIMINGS")
        if path and self.ready_at is not None:
            with open(path, "a") as out:
                out.write(
                    json.dumps(
                        {"isolation": self.isolation, "boot_ms": round((self.ready_at - self.launched_at) * 1000, 1)}
                    )
                    + "\n"
                )

    def _stop_shared(self, grace: float) -> None:
        """End virtiofsd before the services unmount the volumes its sandbox still holds."""
        shared, self.shared = self.shared, []
        for folder in shared:
            folder.stop(grace)

    def stop(self) -> None:
        self._release_terminal()
        self._close_execs()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._stop_shared(SHARED_GRACE)
        self.ports.close()
        if self.vtpm is not None:
            self.vtpm.stop()


class _ExecSession:
    """One `cove exec` in the launcher: the guest's lines for its client, bounded in bytes (the guest
    stops at its window; one past the bound is dropped), and the input window (bytes sent to the
    guest and not yet acknowledged)."""

    def __init__(self, with_input: bool) -> None:
        self.input = with_input
        self.lines: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.queued = 0
        self.overflow = threading.Event()
        self.left = threading.Event()  # the client left (or the session is over)
        self._window = threading.Condition()
        self._in_flight = 0

    def offer(self, line: bytes) -> None:
        with self._window:
            if self.queued + len(line) > EXEC_QUEUE_BYTES:
                self.overflow.set()
                return
            self.queued += len(line)
        self.lines.put(line)

    def take(self, timeout: float) -> bytes:
        line = self.lines.get(timeout=timeout)
        with self._window:
            self.queued -= len(line)
        return line

    def acked(self, written: int) -> None:
        with self._window:
            self._in_flight -= min(written, self._in_flight)
            self._window.notify_all()

    def reserve(self, size: int) -> bool:
        """Wait until SIZE more input bytes fit in the guest's window; False once the session is over."""
        with self._window:
            while self._in_flight + size > EXEC_IN_WINDOW:
                if self.left.is_set():
                    return False
                self._window.wait(0.5)
            self._in_flight += size
            return not self.left.is_set()

    def over(self) -> None:
        self.left.set()
        with self._window:
            self._window.notify_all()


HEX = frozenset(b"0123456789abcdefABCDEF")


def exec_client_input(line: bytes) -> bytes | None:
    """The input bytes of a client's `i<hex>` line (b"" for `i` and for a `w<rows>:<cols>` line), or
    None for the end of the connection or a line that is neither."""
    if not line.endswith(b"\n"):
        return None
    body = line[1:-1]
    if line[:1] == b"i" and len(body) % 2 == 0 and len(body) <= 2 * 4096 and all(c in HEX for c in body):
        return bytes.fromhex(body.decode())
    rows, colon, cols = body.partition(b":")
    if line[:1] == b"w" and colon and rows.isdigit() and cols.isdigit() and len(body) <= 11:
        if int(rows) <= 0xFFFF and int(cols) <= 0xFFFF:
            return b""
    return None


def _send(conn: socket.socket, data: bytes) -> bool:
    try:
        conn.sendall(data)
        return True
    except OSError:
        return False


def exec_socket(launcher_pid: int) -> Path | None:
    """The `cove exec` socket of the running vm enclave that process LAUNCHER_PID launched, if any.

    Only folders this user made count (the runtime folder may be shared, e.g. /dev/shm)."""
    from cove.runtime.launcher import runtime_dir

    found = []
    for path in runtime_dir().glob(f"cove-enclave-{launcher_pid}-*/vm-*/{EXEC_SOCKET}"):
        try:
            owned = all(os.lstat(p).st_uid == os.getuid() for p in (path.parent.parent, path.parent, path))
        except OSError:
            continue
        if owned and path.parent.parent.name.startswith(f"cove-enclave-{launcher_pid}-"):
            found.append(path)
    return found[0] if len(found) == 1 else None


class VmBackend(Backend):
    name = NAME
    isolation = "vm"
    strength = 0  # never chosen by `auto`: a vm build carries its own launch measurement
    takes_terminal = False  # --debug-enclave at a terminal: the guest's own (VmEnclave.own_terminal)

    @classmethod
    def availability(cls) -> Availability:
        if find_tool("qemu-system-x86_64") is None:
            return Availability(cls.name, cls.isolation, False, "QEMU is not installed (scripts/setup)")
        try:
            kernel = vmimage.find_kernel(None)
        except CoveError as exc:
            return Availability(cls.name, cls.isolation, False, exc.line())
        forced = os.environ.get("COVE_VM_ACCEL")
        cached = (
            forced
            if forced in ("kvm", "tcg")
            else (_known_accelerator() if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg")
        )
        isolation = {"kvm": KVM, "tcg": TCG}.get(cached or "", cls.isolation)
        note = f"kernel {kernel.name}; " + (
            "KVM or TCG: probed at the first run"
            if cached is None
            else "no usable /dev/kvm"
            if cached == "tcg"
            else "KVM boots it"
        )
        return Availability(cls.name, isolation, True, note)

    def __init__(self) -> None:
        self._prepared: tuple | None = None
        self._signer: ReportSigner | None = None
        self._attestation_type = "none"
        self._vtpm: Vtpm | None = None
        self._provisioning: threading.Thread | None = None
        self._quoter: VtpmQuoter | None = None
        self._vtpm_error: CoveError | None = None
        self._device: TpmDevice | None = None

    def prepare(self, build_dir: Path | None, launch: dict | None, workdir: Path) -> None:
        """Copy and check kernel, initramfs and launch description, and settle KVM or TCG,
        before the services start: a tampered build fetches no secrets and boots nothing."""
        if launch is None or build_dir is None:
            raise CoveError(
                "this build has no vm launch measurement", 'set [enclave] backend = "vm" and rebuild with `cove build`'
            )
        folder = Path(tempfile.mkdtemp(prefix="vm-", dir=workdir))
        description, kernel, initrd = vmimage.load(build_dir, launch["measurement"], folder)
        accel = accelerator(description, kernel, initrd, folder)
        self.isolation = KVM if accel == "kvm" else TCG  # type: ignore[misc]  # this run's: KVM or TCG
        self._prepared = (description, kernel, initrd, folder, accel)
        self._signer, self._attestation_type = _platform_signer()
        if self._signer is not None:
            from cove.runtime.vm_vtpm import Vtpm  # only vm runs pay for this import

            self._vtpm = Vtpm.start(folder)  # in this thread: it dies with the launcher
            self._provisioning = threading.Thread(
                target=self._provision, args=(bytes(launch["measurement"]),), daemon=True
            )
            self._provisioning.start()  # overlaps the services' start and the guest's boot

    def _provision(self, launch: bytes) -> None:
        try:
            assert self._vtpm is not None and self._signer is not None  # prepare() starts this with both
            self._vtpm.provision(launch)
            self._quoter = self._vtpm.quoter(self._signer)
        except CoveError as exc:
            self._vtpm_error = exc

    def _ready(self) -> VtpmQuoter | None:
        """The vTPM's quoter once its launch PCR is extended (None without a platform key)."""
        if self._provisioning is None:
            return None
        self._provisioning.join()
        if self._vtpm_error is not None or self._quoter is None:
            raise CoveError(
                f"the vm's vTPM could not be provisioned: "
                f"{self._vtpm_error.line() if self._vtpm_error else 'no quoter'}"
            )
        return self._quoter

    def vtpm_quote(self) -> Callable[[bytes], VtpmQuote] | None:
        """For evidence made outside the guest (secrets fetched before boot): the vTPM quote of a report."""
        if self._vtpm is None:
            return None

        def quote(report_bytes: bytes) -> VtpmQuote:
            quoter = self._ready()
            if quoter is None:  # a vTPM is running, so provisioning was started
                raise CoveError("the vm's vTPM was never provisioned")
            return quoter(report_bytes)

        return quote

    def release(self) -> None:
        if self._device is not None:
            self._device.close()
        if self._vtpm is not None:
            self._vtpm.stop()

    def attach_tpm(self) -> TpmDevice:
        """A build with [vm] tpm_device: the vTPM as the guest's TPM, attached once its launch PCR is
        extended (QEMU sends its first TPM commands while it starts, before the guest runs)."""
        from cove.runtime.vm_tpmdev import TpmDevice  # only builds with the device pay for this import

        if self._vtpm is None:
            raise CoveError(
                "this vm build gives the guest a TPM device, but the platform has no key to certify a vTPM",
                "run `cove platform init`, or build without [vm] tpm_device",
            )
        self._ready()
        self._device = TpmDevice(self._vtpm)
        return self._device

    @staticmethod
    def _files(spec: LaunchSpec) -> list[tuple[str, bytes]]:
        """The services' binds the guest can have: read-only files on a tmpfs mount (file: secrets)."""
        tmpfs = [m.target.rstrip("/") + "/" for m in spec.config.mounts if m.type == "tmpfs"]
        encrypted = shared_tags(spec.config)
        files = []
        for bind in spec.binds:
            if bind.target.startswith("/dev/attestation"):
                continue  # the guest init serves it
            if bind.target in encrypted and bind.host.is_dir():
                continue  # an encrypted mount's plaintext view: exported over virtio-fs (_share)
            if not bind.writable and bind.host.is_file() and any(bind.target.startswith(t) for t in tmpfs):
                files.append((bind.target, bind.host.read_bytes()))
                continue
            raise CoveError(
                f"{bind.target} (a host path the enclave's services provide) is not available on the vm backend yet",
                'use backend = "sim" for it',
            )
        return files

    @staticmethod
    def _share(spec: LaunchSpec, folder: Path) -> list[SharedFolder]:
        """A virtiofsd for each encrypted mount's plaintext view (the services mounted them on the host)
        and for each host mount's folder (checked as sim checks it)."""
        from cove.runtime import vm_shared  # only runs with encrypted or host mounts pay for this import

        tags = shared_tags(spec.config)
        hosts = {m.target: m for m in spec.config.mounts if m.type == "host"}
        started: list[SharedFolder] = []
        try:
            for mount in hosts.values():
                vm_shared.check_host_source(mount.source, mount.writable)  # before any virtiofsd starts
            for bind in spec.binds:
                if bind.target in tags and bind.target not in hosts and bind.host.is_dir():
                    started.append(
                        vm_shared.start(tags[bind.target], bind.target, bind.host, folder, spec.uid, spec.gid)
                    )
            for target, mount in hosts.items():
                source = Path(mount.source or "")
                started.append(
                    vm_shared.start(
                        tags[target], target, source, folder, spec.uid, spec.gid, not mount.writable, "host"
                    )
                )
        except BaseException:
            for shared in started:
                shared.stop()
            raise
        missing = set(tags) - {s.target for s in started}
        if missing:
            for shared in started:
                shared.stop()
            raise CoveError(f"encrypted mount {sorted(missing)[0]} was not served")
        return started

    @staticmethod
    def _share_root(spec: LaunchSpec, folder: Path) -> SharedFolder:
        """A --encrypt-image build: a read-only virtiofsd for the root the launcher mounted on the host
        after the key's release (cove.fs.encrypted_image.ImageMount: it decrypts and checks each file
        against the signed listing), so the guest's root never exists as plaintext on the host's disk."""
        from cove.runtime import vm_shared

        if not os.path.ismount(spec.root):
            raise CoveError(
                "this vm build boots an encrypted image, but the run has no encrypted root to serve",
                "build again with `cove build --encrypt-image SOURCE` (build/image.enc is missing)",
            )
        return vm_shared.start(
            vmimage.ROOT_TAG, "/", spec.root, folder, spec.uid, spec.gid, read_only=True, kind="encrypted image"
        )

    def launch(self, spec: LaunchSpec) -> VmEnclave:
        if self._prepared is None:
            self.prepare(spec.build_dir, spec.launch, spec.workdir or Path(tempfile.gettempdir()))
        assert self._prepared is not None  # prepare() set it
        description, kernel, initrd, workdir, accel = self._prepared
        files = self._files(spec)
        root = vmimage.encrypted_root(description)
        size = user_terminal_size() if spec.interactive else None
        request = encode_request(
            spec, self._attestation_type, files, sealing_keys(spec.identity), vmimage.ROOT_TAG if root else "", size
        )
        started = time.monotonic()  # virtiofsd's start counts in the boot's time
        shared = [self._share_root(spec, workdir)] if root else []
        try:
            shared += self._share(spec, workdir)
        except BaseException:
            for folder in shared:
                folder.stop()
            raise
        ports = SerialPorts()
        try:
            device = self.attach_tpm() if vmimage.tpm_device(description) else None
            fds = {s.tag: s.qemu_end.fileno() for s in shared if s.qemu_end is not None}
            tpm = device.qemu_end.fileno() if device is not None else None
            process = _boot(description, kernel, initrd, accel, workdir, ports, fds, tpm)
        except BaseException:
            for folder in shared:
                folder.stop()
            raise
        for folder in shared:
            folder.handed_over()
        if device is not None:
            device.handed_over()
        enclave = VmEnclave(
            spec,
            KVM if accel == "kvm" else TCG,
            process,
            ports,
            workdir,
            started,
            self._signer,
            self._vtpm,
            self._ready,
            request,
            shared,
        )
        if size is not None:
            enclave.own_terminal()
        return enclave


def user_terminal_size() -> tuple[int, int] | None:
    """The rows and columns of the user's terminal, when stdin and stdout are one (else None)."""
    if not (os.isatty(0) and os.isatty(1)):
        return None
    size = os.get_terminal_size(1)
    return min(size.lines, 0xFFFF), min(size.columns, 0xFFFF)


def sealing_keys(identity: Identity) -> bytes:
    """The enclave's two sealing keys (mrenclave's, then mrsigner's) as sim's /dev/attestation/keys/ has
    them: the same derivation from the same platform root secret. Without a root secret the guest has no
    keys/ folder (one warning line); sim's folder then fails each read."""
    from cove.platform import sealing

    try:
        keys = sealing.enclave_keys(identity)
    except CoveError as exc:
        print(f"cove: warning: /dev/attestation has no sealing keys: {exc.line()}", file=sys.stderr, flush=True)
        return b""
    return keys["_sgx_mrenclave"] + keys["_sgx_mrsigner"]


def _platform_signer():
    """The platform key that signs this enclave's reports, as /dev/attestation on sim has it."""
    from cove.platform import monitor

    try:
        return monitor.signer(), "cove"
    except CoveError as exc:
        print(f"cove: warning: /dev/attestation cannot quote: {exc.line()}", file=sys.stderr, flush=True)
        return None, "none"


def _qemu_key() -> str:
    st = os.stat(qemu())
    return f"{st.st_size}:{st.st_mtime_ns}"


def _probe_table() -> dict[str, str]:
    """The cached probe answers: "KERNEL_SHA256:QEMU_SIZE:QEMU_MTIME" -> "kvm" or "tcg"."""
    try:
        table = decode_json((_cache_dir() / "accel.json").read_bytes(), ValueError, "accel.json", limit=ACCEL_CACHE)
    except (OSError, ValueError):
        return {}
    if not isinstance(table, dict):
        return {}
    # an entry that is not one of the two answers is not an answer: that kernel is probed again
    return {k: v for k, v in table.items() if isinstance(k, str) and v in ("kvm", "tcg")}


def _read_probe(kernel_digest: bytes) -> str | None:
    try:
        return _probe_table().get(f"{kernel_digest.hex()}:{_qemu_key()}")
    except (OSError, SetupError):
        return None


def _known_accelerator() -> str | None:
    """What the probes of this QEMU found, if they all agree (for `cove info`; reads no kernel)."""
    try:
        suffix = ":" + _qemu_key()
    except (OSError, SetupError):
        return None
    found = {v for k, v in _probe_table().items() if k.endswith(suffix)}
    return found.pop() if len(found) == 1 else None


def accelerator(description: dict, kernel: Path, initrd: Path, workdir: Path) -> str:
    """kvm if /dev/kvm boots this kernel to Cove's init (a probe boot, cached per kernel and QEMU), else tcg."""
    forced = os.environ.get("COVE_VM_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    cached = _read_probe(bytes(description["kernel"]))
    if cached:
        return cached
    accel = "kvm" if probe(description, kernel, initrd, workdir, "kvm") else "tcg"
    path = _cache_dir() / "accel.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = _probe_table()
    table[f"{bytes(description['kernel']).hex()}:{_qemu_key()}"] = accel
    from cove.util import write_atomic

    write_atomic(path, json.dumps(table).encode())
    return accel


def probe(
    description: dict, kernel: Path, initrd: Path, workdir: Path, accel: str, timeout: float = PROBE_TIMEOUT
) -> float | None:
    """Boot the checked kernel and initramfs with ACCEL and ask Cove's init only to answer
    (it starts no program); seconds to its answer, or None if it never answered. Without a TPM device:
    whether KVM boots the kernel does not depend on it, and the probe has no vTPM to attach."""
    devices = [d for d in description.get("devices", ()) if d != vmimage.TPM_DEVICE]
    description = {**description, "devices": devices}
    folder = Path(tempfile.mkdtemp(prefix="probe-", dir=workdir))
    ports = SerialPorts()
    started = time.monotonic()
    process = _boot(description, kernel, initrd, accel, folder, ports)
    ctl = ports.host("cove.ctl")
    try:
        ctl.sendall(struct.pack("<I", 2) + b"Q\0")
        buffer = b""
        while time.monotonic() - started < timeout:
            ready, _, _ = select.select([ctl], [], [], 0.2)
            if ready:
                try:
                    chunk = ctl.recv(256)
                except OSError:
                    break
                if not chunk:
                    break
                buffer += chunk
                if b"X0\n" in buffer:
                    return time.monotonic() - started
        return None
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        ports.close()
