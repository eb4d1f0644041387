"""The enclave's seccomp filter, compiled to BPF by libseccomp.

libseccomp (the library systemd, Docker and bubblewrap's users rely on) does
the compiling; this module is only its ctypes glue and Cove's deny list. The
compiled program is handed to bubblewrap with ``--seccomp FD``; bubblewrap
loads it as the last step before it executes the program. Syscalls of other
architectures (i386, x32) are killed by libseccomp's default bad-arch action.
A deny list fails open for syscalls added after it was written, so every number
above the reviewed ones answers ENOSYS (docs/threat-model.md lists them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from functools import lru_cache
from typing import TYPE_CHECKING


from cove.errors import SetupError

if TYPE_CHECKING:
    from cove.config import Config

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_NE = 1
SCMP_CMP_MASKED_EQ = 7
# clone() may not create namespaces; clone3() hides its flags in memory, so it
# answers ENOSYS and glibc falls back to clone(), as under Docker's profile.
CLONE_NAMESPACE_FLAGS = (
    0x00020000,
    0x02000000,
    0x04000000,
    0x08000000,
    0x10000000,
    0x20000000,
    0x40000000,
    0x00000080,
)  # NEWNS UTS IPC USER PID NET CGROUP TIME

# Denied with EPERM in every enclave. docs/threat-model.md lists them with reasons.
DENIED_SYSCALLS = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "kexec_load",
    "kexec_file_load",
    "bpf",
    "perf_event_open",
    "init_module",
    "finit_module",
    "delete_module",
    "keyctl",
    "add_key",
    "request_key",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "swapon",
    "swapoff",
    "reboot",
    "syslog",
    "acct",
    "quotactl",
    "lookup_dcookie",
    "iopl",
    "ioperm",
    "personality",
    "modify_ldt",  # 16-bit segments: old Wine/DOS emulators only, a source of kernel bugs (Docker allows it)
    "sysfs",  # the host kernel's file system types, an obsolete call (Docker denies it)
    "memfd_secret",  # pages taken out of the kernel's direct map, unswappable; nothing here needs it
    # ptrace's neighbours, as Docker denies them without CAP_SYS_PTRACE (docs/threat-model.md says what
    # still reaches a process of the same enclave: /proc/PID/mem)
    "kcmp",
    "pidfd_getfd",
    "process_madvise",
)
# Names that are not system calls on some architecture on purpose: skipped there, never silently
# elsewhere (a misspelt or unknown name in DENIED_SYSCALLS fails the build of the filter).
ABSENT_ON_SOME_ARCHES = frozenset({"iopl", "ioperm", "modify_ldt"})

# libseccomp 2.5.4 (Debian 12) names syscalls up to 456; newer ones are reached by number. Since Linux
# 5.1 (424) new syscalls take the same number on every architecture but alpha and mips, so these are
# the numbers on x86_64 and arm64. Each was reviewed: allowed (None) or denied with an errno.
REVIEWED_NEW_SYSCALLS: dict[int, tuple[str, int | None]] = {
    451: ("cachestat", None),
    452: ("fchmodat2", None),
    453: ("map_shadow_stack", None),
    454: ("futex_wake", None),
    455: ("futex_wait", None),
    456: ("futex_requeue", None),
    457: ("statmount", errno.EPERM),  # the mount table with host paths (as mountinfo would be unmasked)
    458: ("listmount", errno.EPERM),
    459: ("lsm_get_self_attr", errno.ENOSYS),  # LSM state: absent, as on an older kernel
    460: ("lsm_set_self_attr", errno.ENOSYS),
    461: ("lsm_list_modules", errno.ENOSYS),
    462: ("mseal", None),  # only restricts the caller's own mappings
    463: ("setxattrat", None),  # the *at forms of xattr calls that are allowed anyway
    464: ("getxattrat", None),
    465: ("listxattrat", None),
    466: ("removexattrat", None),
    467: ("open_tree_attr", errno.EPERM),  # the mount API, as open_tree
    468: ("file_getattr", None),  # FS_IOC_FSGETXATTR as a syscall
    469: ("file_setattr", None),
}
# Every number above the reviewed ones, up to here, answers ENOSYS (as an older kernel would): a
# syscall added after this review is refused until it is reviewed, not allowed by default (runc and
# Docker answer unknown syscalls the same way). On x86_64, 512-547 are x32's (whose calls the filter
# kills), so new native calls go on to 548 and up: 470-579 leaves 42 + 32 numbers, about seven years of
# new syscalls at ~10 a year. Each number is a rule libseccomp compiles at every start (a new process,
# or a supervisor): up to 579 the filter takes ~0.7 ms to build, up to 1023 ~7 ms.
UNREVIEWED_LIMIT = 579
# ioctl requests denied whatever the descriptor: TIOCSTI pushes input into a terminal (the user's
# shell, when the enclave shares its terminal), TIOCLINUX reads and writes the Linux console; and
# what would leave the user's terminal broken after the run, which the launcher's restore of its
# settings (modes, window size) does not cover: TIOCSETD (another line discipline, even one the
# kernel loads as a module), TIOCEXCL (no other open of the terminal, the user's next ones included),
# TCXONC (output or input stopped). Masked to 32 bits: the kernel reads an unsigned int request.
DENIED_IOCTLS = (0x5412, 0x541C, 0x5423, 0x540C, 0x540A)  # TIOCSTI, TIOCLINUX, TIOCSETD, TIOCEXCL, TCXONC
SCMP_FLTATR_CTL_OPTIMIZE = 8
# With network mode "none" only Unix sockets can be created: socket() and socketpair() with any
# other family answer EACCES. The rule compares all 64 bits against AF_UNIX, so a family with high
# bits set (the kernel reads only the low 32) is refused too; netlink, vsock, packet, ... are refused.
AF_UNIX = 1
# AF_VSOCK reaches the hypervisor and is not network-namespaced: refused unless the network is "host".
# Masked: the kernel reads the low 32 bits of the family.
AF_VSOCK = 40
LOW_32 = 0xFFFFFFFF
# io_uring submits work the filter never sees (IORING_OP_SOCKET opens sockets, ...): ENOSYS, so
# programs fall back to plain syscalls, unless [security] io_uring = true.
IO_URING = ("io_uring_setup", "io_uring_enter", "io_uring_register")


class _Arg(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)  # no ldconfig round trip
    except OSError:
        name = ctypes.util.find_library("seccomp")
        if not name:
            raise SetupError("libseccomp is not installed", "run scripts/setup (installs libseccomp2)") from None
        lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_Arg),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    return lib


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)  # SCMP_ACT_ERRNO(code)


def enclave_filter(config: Config) -> bytes:
    """The filter an enclave of this configuration runs under: the sandbox's, `cove exec`'s and
    cove-runtime exec's (one place decides, so the three cannot differ)."""
    return compile_filter(config.network.mode, io_uring=config.security.io_uring)


@lru_cache(maxsize=8)
def compile_filter(network_mode: str, extra_denied: tuple[str, ...] = (), io_uring: bool = False) -> bytes:
    """The BPF program (struct sock_filter array) for an enclave."""
    lib = _lib()
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise SetupError("libseccomp could not start a filter")
    try:
        # a binary tree over syscall numbers: the hundreds of ENOSYS rules below cost a few jumps
        _check(lib.seccomp_attr_set(ctx, SCMP_FLTATR_CTL_OPTIMIZE, 2), "optimize")
        for name in DENIED_SYSCALLS + extra_denied:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                if name in ABSENT_ON_SOME_ARCHES:
                    continue  # not a syscall on this architecture
                raise SetupError(f"libseccomp does not know the denied syscall {name}", "upgrade libseccomp2")
            _check(lib.seccomp_rule_add_array(ctx, _errno_action(errno.EPERM), number, 0, None), name)
        for number in range(min(REVIEWED_NEW_SYSCALLS), UNREVIEWED_LIMIT + 1):
            name, code = REVIEWED_NEW_SYSCALLS.get(number, (str(number), errno.ENOSYS))
            if code is not None:
                _check(lib.seccomp_rule_add_array(ctx, _errno_action(code), number, 0, None), name)
        ioctl = lib.seccomp_syscall_resolve_name(b"ioctl")
        for request in DENIED_IOCTLS:
            arg = _Arg(1, SCMP_CMP_MASKED_EQ, LOW_32, request)
            _check(lib.seccomp_rule_add_array(ctx, _errno_action(errno.EPERM), ioctl, 1, ctypes.byref(arg)), "ioctl")
        clone = lib.seccomp_syscall_resolve_name(b"clone")
        for flag in CLONE_NAMESPACE_FLAGS:
            arg = _Arg(0, SCMP_CMP_MASKED_EQ, flag, flag)
            _check(lib.seccomp_rule_add_array(ctx, _errno_action(errno.EPERM), clone, 1, ctypes.byref(arg)), "clone")
        clone3 = lib.seccomp_syscall_resolve_name(b"clone3")
        if clone3 >= 0:
            _check(lib.seccomp_rule_add_array(ctx, _errno_action(errno.ENOSYS), clone3, 0, None), "clone3")
        if not io_uring:
            for name in IO_URING:
                number = lib.seccomp_syscall_resolve_name(name.encode())
                if number >= 0:
                    _check(lib.seccomp_rule_add_array(ctx, _errno_action(errno.ENOSYS), number, 0, None), name)
        for call in (b"socket", b"socketpair"):
            number = lib.seccomp_syscall_resolve_name(call)
            if network_mode == "none":
                arg = _Arg(0, SCMP_CMP_NE, AF_UNIX, 0)
            elif network_mode != "host":
                arg = _Arg(0, SCMP_CMP_MASKED_EQ, LOW_32, AF_VSOCK)
            else:
                continue
            _check(
                lib.seccomp_rule_add_array(ctx, _errno_action(errno.EACCES), number, 1, ctypes.byref(arg)),
                call.decode(),
            )
        fd = os.memfd_create("cove-seccomp", os.MFD_CLOEXEC)
        try:
            _check(lib.seccomp_export_bpf(ctx, fd), "export")
            size = os.lseek(fd, 0, os.SEEK_CUR)
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def _check(result: int, what: str) -> None:
    if result < 0:
        raise SetupError(f"libseccomp refused the rule for {what}: {os.strerror(-result)}")
