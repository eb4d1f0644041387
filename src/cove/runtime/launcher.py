"""`cove run`: from a built instance (or a package) to a running enclave and its exit code.

The order matters and is the security argument: verify the signature and the
configuration, copy the image from verified bytes into a private root, check
the program against the entry points, then launch; signals are forwarded to
the program, and its exit code comes back. A build made with --encrypt-image
is never copied in plain: its root is a read-only FUSE view that decrypts
and checks each file against the signed listing as the enclave reads it.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import signal
import stat
import subprocess
import tempfile
from contextlib import ExitStack, contextmanager
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cove import trace
from cove.config import Config
from cove.errors import CannotExecuteError, CoveError, ProgramNotFoundError
from cove.image import artifacts, encryption
from cove.image import elf, staging
from cove.image.artifacts import VerifiedBuild
from cove.image.encryption import EncryptedImage
from cove.image.identity import EnclaveIdentity
from cove.image.paths import open_in_image, resolve_in_image
from cove.runtime import backend as backend_mod
from cove.runtime import enclave_services as services_mod
from cove.runtime.backend import LaunchSpec
from cove.runtime.terminal import Terminal
from cove.util import entry_point_allows

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


@dataclass(frozen=True)
class RunRequest:
    program: str
    args: tuple[str, ...] = ()
    backend: str | None = None
    debug_shell: bool = False
    expected_signer: bytes | None = None
    state_dir: Path | None = None  # default: instance/run, or ~/.local/state/cove/NAME for a package
    host_env: dict[str, str] | None = None  # where [env] passthrough values come from (default: os.environ)


def runtime_dir() -> Path:
    """Where private enclave roots are made: a tmpfs when one is there, never shared."""
    configured = os.environ.get("COVE_RUNTIME_DIR")
    if configured:
        return Path(configured)
    for candidate in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(candidate) and os.access(candidate, os.W_OK):
            return Path(candidate)
    return Path(tempfile.gettempdir())


def allowed(program: str, entry_points: tuple[str, ...]) -> bool:
    """Whether PROGRAM (absolute, normalised) is admitted by one of the entry-point prefixes."""
    return entry_point_allows(program, entry_points)


def resolve_user(user: str, root: Path) -> tuple[int, int]:
    """UID and GID for [process] user: root, UID[:GID], or a name in the image's /etc/passwd."""
    if user == "root":
        return 0, 0
    if user[0].isdigit():
        uid, _, gid = user.partition(":")
        return int(uid), int(gid or uid)
    for line in _image_passwd(root).splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == user:
            try:
                return int(fields[2]), int(fields[3])
            except ValueError:
                break
    raise CoveError(
        f"user {user!r} is not in the image's /etc/passwd", 'add it there, or use "UID:GID" in [process] user'
    )


MAX_PASSWD = 1 << 20


def _image_passwd(root: Path) -> str:
    """The image's /etc/passwd ("" when there is none), read by a process that may be root (the daemon,
    a supervisor, cove-runtime): links followed within the image only, a regular file only, at most
    MAX_PASSWD bytes, so an image's link to the host's /etc/shadow, a FIFO or /dev/zero reads nothing."""
    try:
        fd = open_in_image(root, "/etc/passwd")
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CoveError("the image's /etc/passwd is not a regular file", 'use "UID:GID" in [process] user')
        data = b""
        while len(data) <= MAX_PASSWD and (chunk := os.read(fd, 1 << 16)):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > MAX_PASSWD:
        raise CoveError(
            f"the image's /etc/passwd is larger than {MAX_PASSWD >> 20} MiB", 'use "UID:GID" in [process] user'
        )
    return data.decode("utf-8", "replace")


def build_environment(config: Config, host: dict[str, str] | None = None) -> dict[str, str]:
    """The enclave's environment: [env] default, plus the passthrough names the host has."""
    source: Mapping[str, str] = os.environ if host is None else host
    env = dict(config.env.default)
    for name in config.env.passthrough:
        if name in source:
            env[name] = source[name]
    return env


def _check_program(root: Path, program: str) -> None:
    path = resolve_in_image(root, program, follow_last=True)
    if not path.is_file():
        raise ProgramNotFoundError(f"{program} is not in the image", "add it with `cove add` and rebuild")
    if not os.access(path, os.X_OK):
        raise CannotExecuteError(f"{program} is not executable", "chmod +x it in image/ and rebuild")


def _validate_request(verified: VerifiedBuild, request: RunRequest) -> str:
    program = request.program
    if not program.startswith("/"):
        example = "/bin/" + posixpath.basename(posixpath.normpath(program))
        raise CoveError(f"{program}: give the program's absolute path inside the enclave, e.g. {example}")
    program = posixpath.normpath(program)
    config = verified.config
    if request.debug_shell:
        if not config.enclave.debug:
            raise CoveError(
                "--debug-enclave needs a debug enclave",
                "set [enclave] debug = true and rebuild; never ship a debug enclave",
            )
    elif not allowed(program, config.process.entry_points):
        raise CoveError(
            f"{program} is not an entry point of this enclave",
            f"allowed: {', '.join(config.process.entry_points)} ([process] entry_points)",
        )
    return program


def remove_stale(base: Path, prefix: str) -> None:
    """Remove private roots left by launchers that were killed (their pid is gone)."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            path = base / name
            if os.stat(path).st_uid == os.getuid():
                _detach_mounts_below(path)  # FUSE servers died with their launcher
                shutil.rmtree(path, ignore_errors=True)


def _detach_mounts_below(path: Path) -> None:
    try:
        with open("/proc/self/mounts") as mounts:
            points = [line.split()[1].encode().decode("unicode_escape") for line in mounts]
    except OSError:
        return
    prefix = str(path) + "/"
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


@contextmanager
def _workdir() -> Iterator[Path]:
    """A private folder for this run (the image copy, service mounts), removed afterwards."""
    base = runtime_dir()
    remove_stale(base, "cove-enclave-")
    workdir = Path(tempfile.mkdtemp(prefix=f"cove-enclave-{os.getpid()}-", dir=base))
    try:
        yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _private_root(verified: VerifiedBuild, image: Path, workdir: Path, in_place: bool, stored: bool = False) -> Path:
    """The verified root the enclave will see (a node store's tree was verified at import: bound as is)."""
    root = (
        image
        if stored
        else staging.stage(
            image, verified.entries, verified.manifest.image_root, None if in_place else workdir / "root"
        )
    )
    staging.add_mount_points(root, [m.target for m in verified.config.mounts])
    return root


class _Services:
    """The enclave's services: begun before the image is copied, started after, stopped last first."""

    def __init__(self, ctx: services_mod.ServiceContext):
        self.ctx = ctx
        self.all = services_mod.services_for(ctx)
        self.begun: list[services_mod.EnclaveService] = []

    def __enter__(self) -> _Services:
        try:
            for service in self.all:
                service.begin(self.ctx)  # slow starts overlap with the image copy
                self.begun.append(service)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def start(self) -> tuple[list[services_mod.Bind], dict[str, str]]:
        binds: list[services_mod.Bind] = []
        env: dict[str, str] = {}
        for service in self.begun:
            binds.extend(service.start(self.ctx))
            env.update(service.environment())
        return binds, env

    def __exit__(self, *_exc) -> None:
        for service in reversed(self.begun):
            service.stop()


def default_state_dir(name: str) -> Path:
    """Where a packaged enclave keeps its persistent state unless --state says otherwise."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "cove" / name


def _image_mount_points(verified: VerifiedBuild, binds: list[services_mod.Bind]) -> tuple[list, list]:
    """Folders and files the sandbox mounts over, which a read-only image root must already have:
    the usual ones, the [[mounts]] targets and the services' binds."""
    targets = [b for b in binds if not b.target.startswith("/dev/")]
    folders = [
        *staging.ALWAYS,
        *(m.target for m in verified.config.mounts),
        *(b.target for b in targets if b.host.is_dir()),
    ]
    files = [b.target for b in targets if not b.host.is_dir()]
    return [f.strip("/") for f in folders], [f.strip("/") for f in files]


@contextmanager
def _sandbox_prepared(chosen: backend_mod.Backend, verified: VerifiedBuild, request: RunRequest) -> Iterator[None]:
    """A sim sandbox's first process forked now, already joining its cgroups (sim.Prepared): the kernel's
    10 to 20 ms wait for that join then overlaps the services' start instead of delaying the launch. Its
    limits are the verified configuration's (the build is verified before this runs); one the launch did
    not take (a failure before it) is let go."""
    if chosen.name != "sim" or request.debug_shell:  # an interactive launch takes no prepared sandbox
        yield
        return
    from cove.runtime import sim

    sim.prepare(verified.config.resources)  # a no-op when a node supervisor prepared it for these limits
    try:
        yield
    finally:
        sim.discard_prepared()


def run_verified(
    verified: VerifiedBuild,
    image: Path,
    request: RunRequest,
    state_dir: Path,
    in_place: bool = False,
    encrypted: EncryptedImage | None = None,
    build_dir: Path | None = None,
    stored: bool = False,
) -> int:
    """Launch a verified build and return the program's exit code.

    The root is a verified private copy of ``image``, or, for a build made
    with --encrypt-image, the decrypting read-only view of ``encrypted``.
    """
    laps = trace.Laps("launch.")
    program = _validate_request(verified, request)
    chosen = backend_mod.choose(verified.config.enclave.backend, request.backend)
    laps.lap("choose-backend")
    enclave_cfg = verified.config.enclave
    identity = EnclaveIdentity(
        enclave_cfg.name,
        verified.measurement,
        verified.signer,
        enclave_cfg.product_id,
        enclave_cfg.svn,
        enclave_cfg.debug,
    )
    instance_id = os.urandom(8).hex()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with (
        laps.on_exit("cleanup"),
        _sandbox_prepared(chosen, verified, request),
        _workdir() as workdir,
        chosen.prepared(build_dir, verified.manifest.launch, workdir),
    ):  # vm: launch inputs checked, vTPM
        laps.lap("prepare+workdir")
        ctx = services_mod.ServiceContext(
            identity,
            verified.config,
            instance_id,
            chosen.name,
            chosen.isolation,
            state_dir,
            workdir,
            image_key=encrypted.key if encrypted else None,
            vtpm_quote=chosen.vtpm_quote(),
        )
        with _Services(ctx) as services, ExitStack() as mounted:
            laps.lap("services-begin")
            if encrypted is None:
                root = _private_root(verified, image, workdir, in_place, stored)
                _check_program(root, program)
            else:
                from cove.fs.encrypted_image import ImageMount

                image_mount = ImageMount(encrypted.volume, encrypted.key, identity, verified.entries, workdir / "root")
                mounted.callback(image_mount.stop)
                image_mount.spawn()  # its start-up overlaps the services'
            laps.lap("root")
            binds, service_env = services.start()
            laps.lap("services-start")
            if encrypted is None:
                staging.add_mount_points(root, [b.target for b in binds if not b.target.startswith("/dev/")])
            else:
                root = image_mount.start(*_image_mount_points(verified, binds))
                _check_program(root, program)
            elf.check_startable(root, program)
            uid, gid = resolve_user(verified.config.process.user, root)
            spec = LaunchSpec(
                identity=identity,
                config=verified.config,
                root=root,
                argv=(program, *request.args),
                env={**build_environment(verified.config, request.host_env), **service_env},
                uid=uid,
                gid=gid,
                instance_id=instance_id,
                interactive=request.debug_shell,
                binds=tuple(binds),
                build_dir=build_dir,
                launch=verified.manifest.launch,
                workdir=workdir,
            )
            laps.lap("checks")
            return _supervise(chosen, spec, laps)


def _supervise(chosen: backend_mod.Backend, spec: LaunchSpec, laps: trace.Laps | None = None) -> int:
    previous = {}
    enclave = None
    # the enclave's own pty takes the terminal's signals (vm relays a debug run's terminal itself); any other
    # run, a debug one whose stdin or stdout is no terminal too, relays them: its program has a session of
    # its own, out of the terminal's reach
    own_terminal = spec.interactive and chosen.takes_terminal and Terminal.wanted()

    held: list[int] = []  # signals before the enclave exists: relayed once it does, never dropped

    def forward(signum, _frame):
        if own_terminal:  # an interactive one has the terminal's signals
            return
        if enclave is None:
            held.append(signum)
        else:
            enclave.signal(signum)

    for signum in FORWARDED_SIGNALS:
        # caught, never ignored: an ignored signal would stay ignored in the enclave across exec
        previous[signum] = signal.signal(signum, forward)
    try:
        with ExitStack() as stack:
            terminal = None
            if own_terminal:
                terminal = stack.enter_context(Terminal())
                terminal.attach()  # the sandbox starts on the enclave's own terminal
            try:
                enclave = chosen.launch(spec)
            finally:
                if terminal is not None:
                    terminal.detach()
            while held:
                enclave.signal(held.pop(0))
            if laps is not None:
                laps.lap("sandbox-launch")
            return enclave.wait()
    finally:
        if laps is not None:
            laps.lap("enclave-run")
        if enclave is not None:
            enclave.stop()
        if laps is not None:
            laps.lap("enclave-stop")
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_instance(instance_dir: Path, request: RunRequest) -> int:
    build_dir = instance_dir / "build"
    verified = artifacts.load_verified(build_dir, instance_dir / "cove.toml", request.expected_signer)
    return run_verified(
        verified,
        instance_dir / "image",
        request,
        request.state_dir or instance_dir / "run",
        encrypted=encryption.find(build_dir),
        build_dir=build_dir,
    )


def run_package(package: Path, request: RunRequest) -> int:
    from cove.image import package as package_mod  # tarfile: only a package run needs it

    with package_mod.extracted(package, runtime_dir()) as unpacked:
        verified = artifacts.load_verified(unpacked / "build", unpacked / "cove.toml", request.expected_signer)
        state_dir = request.state_dir or default_state_dir(verified.config.enclave.name)
        return run_verified(
            verified,
            unpacked / "image",
            request,
            state_dir,
            in_place=True,
            encrypted=encryption.find(unpacked / "build"),
            build_dir=unpacked / "build",
        )
