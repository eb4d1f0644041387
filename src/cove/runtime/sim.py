"""The `sim` backend: OS-level isolation with bubblewrap, seccomp and a cgroup.

The program runs in fresh user, pid, ipc, uts, cgroup, mount and (unless the
network mode is host) network namespaces, with every capability dropped, no
new privileges, a seccomp deny list, its own session, and limits on memory,
processes and open files. Its root is the verified private copy of the image,
read-only. It protects against other users and processes of the host, not
against the host's root or kernel (docs/threat-model.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

from cove.config import parse_size
from cove.errors import CoveError, OutOfMemoryError, SetupError
from cove.runtime import seccomp
from cove.runtime.backend import Availability, Backend, LaunchSpec, RunningEnclave, find_tool
from cove.runtime.limits import Limits, detect_mode, memory_text

ISOLATION = "namespaces+seccomp"


def _bwrap() -> str:
    path = find_tool("bwrap")
    if path is None:
        raise SetupError("bubblewrap (bwrap) is not installed", "run scripts/setup")
    return path


def bwrap_arguments(spec: LaunchSpec, seccomp_fd: int, status_fd: int) -> list[str]:
    """The bwrap command line for a spec (seccomp and status descriptors already open)."""
    config = spec.config
    args = [_bwrap(),
            "--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup",
            "--uid", str(spec.uid), "--gid", str(spec.gid),
            "--hostname", config.enclave.name,
            "--die-with-parent", "--cap-drop", "ALL"]
    if config.network.mode != "host":
        args.append("--unshare-net")
    if not spec.interactive:
        args.append("--new-session")
    args += ["--ro-bind", str(spec.root), "/", "--proc", "/proc", "--dev", "/dev"]
    for mount in config.mounts:
        if mount.type == "tmpfs":
            options = dict(mount.options)
            if "size" in options:
                args += ["--size", str(parse_size(options["size"]))]
            args += ["--perms", options.get("mode", "1777")]
            args += ["--tmpfs", mount.target]
        elif mount.type == "host":
            if not os.path.exists(mount.source):
                raise CoveError(f"host mount source {mount.source} does not exist",
                                "create it or remove the mount from cove.toml (and rebuild)")
            args += ["--bind" if mount.writable else "--ro-bind", mount.source, mount.target]
    for bind in spec.binds:
        args += ["--bind" if bind.writable else "--ro-bind", str(bind.host), bind.target]
    args += ["--chdir", config.process.cwd,
             "--seccomp", str(seccomp_fd), "--json-status-fd", str(status_fd), "--"]
    return args + list(spec.argv)


class SimEnclave(RunningEnclave):
    def __init__(self, spec: LaunchSpec, process: subprocess.Popen, status_read: int, limits: Limits):
        super().__init__(spec, SimBackend.name, ISOLATION)
        self.process = process
        self.limits = limits
        self.init_pid: int | None = None
        self.exit_code: int | None = None
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read_status, args=(status_read,), daemon=True)
        self._reader.start()

    def _read_status(self, fd: int) -> None:
        """Follow bwrap's JSON status stream: the sandbox pid, then the exit code."""
        decoder = json.JSONDecoder()
        buffer = ""
        with os.fdopen(fd, "rb") as stream:
            while chunk := stream.read1(4096):
                buffer += chunk.decode("utf-8", "replace")
                while True:
                    buffer = buffer.lstrip()
                    try:
                        item, end = decoder.raw_decode(buffer)
                    except ValueError:
                        break  # an incomplete document: wait for more
                    buffer = buffer[end:]
                    self._status(item)
        self._started.set()

    def _status(self, item: dict) -> None:
        if not isinstance(item, dict):
            return
        if "child-pid" in item:
            self.init_pid = int(item["child-pid"])
            self._started.set()
        if "exit-code" in item:
            self.exit_code = int(item["exit-code"])

    def _program_pid(self) -> int | None:
        """The program's host pid: the child of bwrap's init inside the pid namespace."""
        if self.init_pid is None:
            return None
        try:
            children = Path(f"/proc/{self.init_pid}/task/{self.init_pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def signal(self, signum: int) -> None:
        self._started.wait(timeout=5)
        pid = self._program_pid()
        if pid is None:
            return
        try:
            if self.spec.interactive:
                os.kill(pid, signum)
            else:
                os.killpg(os.getpgid(pid), signum)  # the program's whole process group
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        try:
            code = self.process.wait()
        finally:
            self._reader.join(timeout=2)
        memory = f"resources.memory = {memory_text(self.spec.config.resources.memory)}"
        if self.init_pid is None:
            if self.limits.oom_kills():
                raise OutOfMemoryError(f"killed: out of memory before the program started ({memory})",
                                       "raise resources.memory in cove.toml and rebuild")
            raise CoveError(f"the sandbox failed to start (bwrap exited with {code})",
                            "see bwrap's message above; `cove info` checks the host")
        code = self.exit_code if self.exit_code is not None else code
        if code == 128 + signal.SIGKILL and self.limits.oom_kills():
            raise OutOfMemoryError(f"killed: out of memory ({memory})",
                                   "raise resources.memory in cove.toml and rebuild")
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.limits.release()


class SimBackend(Backend):
    name = "sim"
    isolation = ISOLATION
    strength = 10

    @classmethod
    def availability(cls) -> Availability:
        if find_tool("bwrap") is None:
            return Availability(cls.name, cls.isolation, False, "bubblewrap is not installed (scripts/setup)")
        try:
            seccomp.compile_filter("none")
        except SetupError as exc:
            return Availability(cls.name, cls.isolation, False, exc.line())
        return Availability(cls.name, cls.isolation, True, f"resource limits by {detect_mode()}")

    def launch(self, spec: LaunchSpec) -> SimEnclave:
        program = seccomp.compile_filter(spec.config.network.mode)
        seccomp_fd = os.memfd_create("cove-seccomp", 0)
        os.write(seccomp_fd, program)
        os.lseek(seccomp_fd, 0, os.SEEK_SET)
        status_read, status_write = os.pipe()
        limits = Limits.create(spec.config.resources)
        try:
            args = bwrap_arguments(spec, seccomp_fd, status_write)
            process = subprocess.Popen(
                args, env=spec.env, pass_fds=(seccomp_fd, status_write), close_fds=True,
                preexec_fn=limits.apply_in_child,
                process_group=None if spec.interactive else 0,
                restore_signals=True)
        except BaseException:
            os.close(status_read)
            limits.release()
            raise
        finally:
            os.close(seccomp_fd)
            os.close(status_write)
        return SimEnclave(spec, process, status_read, limits)
