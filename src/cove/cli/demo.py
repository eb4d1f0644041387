"""cove demo: the whole path in one command, each step with what it proved.

Builds an example enclave, starts a key broker on loopback (HTTPS, SQLite,
in this process), has the broker generate secrets that no admin can read,
runs the enclave (the runtime attests it to the broker before the program
starts, and installs the secrets), writes data to an encrypted volume whose
key came from the broker, and shows that a changed enclave gets nothing.
Everything lives in one folder (a temporary one unless --dir is given); no
server and no setup beyond scripts/setup are needed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

from cove.errors import CoveError

if TYPE_CHECKING:
    from cove.kbs.runner import EmbeddedBroker

DB_SECRET = "demo/db/password"
VOLUME_KEY = "demo/volume/key"
PROGRAM = r"""
echo "  [enclave] DB_PASSWORD has ${#DB_PASSWORD} characters (the program never prints it)"
echo "  [enclave] /run/secrets/tls.pem: $(head -n 1 /run/secrets/tls.pem)"
if [ -d /data ] && [ -w /data ]; then
  echo "customer ledger: alice owes bob 42 coins" > /data/ledger.txt && echo "  [enclave] wrote /data/ledger.txt"
  echo "  [enclave] read back: $(cat /data/ledger.txt)"
fi
"""


class Demo:
    def __init__(self, folder: Path, keep: bool):
        self.folder = folder
        self.keep = keep
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("COVE_")}
        self.env.update(
            COVE_KEY=str(folder / "signing-key.pem"),
            COVE_PLATFORM_DIR=str(folder / "platform"),
            XDG_STATE_HOME=str(folder / "state"),
        )
        self.step_no = 0
        self.broker: EmbeddedBroker | None = None

    # -- output ----------------------------------------------------------------------------------------
    def step(self, title: str) -> None:
        self.step_no += 1
        click.secho(f"\n{self.step_no}. {title}", bold=True)

    @staticmethod
    def proved(text: str) -> None:
        click.secho(f"   proved: {text}", fg="green")

    @staticmethod
    def note(text: str) -> None:
        click.echo(f"   {text}")

    def cove(self, *args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "cove", *args], cwd=cwd, env=self.env, capture_output=True, text=True, timeout=300
        )
        if check and done.returncode != 0:
            raise CoveError(f"demo: `cove {' '.join(args)}` failed: {done.stderr.strip() or done.stdout.strip()}")
        return done

    # -- the steps -----------------------------------------------------------------------------------
    def run(self) -> None:
        from cove.kbs.runner import EmbeddedBroker

        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            (self.folder / "platform").mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise CoveError(
                f"cannot use {self.folder} for the demo: {exc.strerror}",
                "pass --dir with a folder you can write, or no --dir",
            ) from None
        click.secho(f"Cove demo in {self.folder}", bold=True)
        broker, ca = self.start_broker()
        with EmbeddedBroker(broker, ca[1], ca[2]) as server:
            self.broker = server
            admin = self.admin(server, ca[0])
            try:
                app = self.build_enclave(server.url, ca[0], "app")
                measurement = self.measurement(app)
                self.secrets(admin, measurement)
                self.run_enclave(app, admin, measurement)
                self.changed_enclave(server.url, ca[0], admin)
            finally:
                admin.close()
        self.step("Done")
        self.note("the secrets reached only the attested enclave, after the runtime proved what it runs;")
        self.note(
            "no admin could read them, the host saw the volume only encrypted, and a changed enclave got nothing."
        )
        self.note("docs/kbs.md explains the protocol, the policies and a real deployment.")

    def start_broker(self):
        from cove.kbs import tls
        from cove.kbs.broker import Broker, Settings

        self.step("Start a key broker on loopback (HTTPS, SQLite, secrets encrypted under a master key)")
        tls_files = tls.make_local_tls(self.folder / "kbs-tls")
        policy = 'types = ["cove"]\n[cove]\nself_certified = true\n'
        broker = Broker(
            Settings(db_url=f"sqlite:///{self.folder / 'kbs.db'}", master_key=os.urandom(32), attestation_policy=policy)
        )
        self.note("attestation policy: Cove evidence, no debug enclaves; this demo's platform is self-certified")
        self.note("(no TPM vouches for its key), so the policy accepts that explicitly, and every result says so")
        return broker, tls_files

    def admin(self, server, ca: Path):
        from joserfc import jwk

        from cove.kbs.client import AdminClient

        key = jwk.generate_key("EC", "P-256")
        server.broker.bootstrap_admin("demo-admin", key.as_dict(private=False))
        self.note(f"broker at {server.url}; admin key 'demo-admin' registered")
        self.proved("the broker serves the KBS protocol over TLS with a certificate the runtime pins")
        return AdminClient(server.url, key, "demo-admin", ca, server.broker.audience)

    def build_enclave(self, url: str, ca: Path, name: str, marker: str | None = None) -> Path:
        from cove.image import signing

        if not Path(self.env["COVE_KEY"]).exists():
            signing.generate_key(Path(self.env["COVE_KEY"]))
        if marker is None:
            self.step("Build an example enclave (a shell program; cove.toml names the broker and the secrets)")
        instance = self.folder / name
        if instance.exists():
            shutil.rmtree(instance)
        self.cove("new", name, cwd=self.folder)
        self.cove("add", "/bin/sh", "/bin/cat", "/bin/echo", "/usr/bin/head", cwd=instance)
        program = instance / "image" / "bin" / "demo-app"
        program.write_text("#!/bin/sh\n" + PROGRAM + (f"echo {marker}\n" if marker else ""))
        program.chmod(0o755)
        config = instance / "cove.toml"
        text = (
            config.read_text()
            + f'''
[[mounts]]
target = "/run/secrets"
type = "tmpfs"

[[mounts]]
target = "/data"
type = "encrypted"
key = "kbs:{VOLUME_KEY}"

[attestation]
kbs = "{url}"
ca = "{ca}"

[[secrets]]
name = "db-password"
resource = "{DB_SECRET}"
target = "env:DB_PASSWORD"

[[secrets]]
name = "tls"
resource = "demo/tls/server"
target = "file:/run/secrets/tls.pem"

[[secrets]]
name = "volume-key"
resource = "{VOLUME_KEY}"
target = "mount:/data"
'''
        )
        config.write_text(text)
        self.cove("build", cwd=instance)
        if marker is None:
            self.note(f"instance {instance}: [attestation] and [[secrets]] are part of the measured configuration")
        return instance

    @staticmethod
    def measurement(instance: Path) -> str:
        return hashlib.sha256((instance / "build" / "manifest.cbor").read_bytes()).hexdigest()

    def secrets(self, admin, measurement: str) -> None:
        from cove.kbs.client import KbsError

        self.step("Have the broker generate secrets that only this enclave may receive")
        admin.put_policy(
            "demo-app", f'types = ["cove"]\n[cove]\nmeasurements = ["{measurement}"]\nself_certified = true\n'
        )
        admin.create_secret(DB_SECRET, "password", "demo-app", exportable=False)
        admin.create_secret(VOLUME_KEY, "aes-256", "demo-app", exportable=False)
        admin.create_secret("demo/tls/server", "cert", "demo-app", exportable=False)
        self.note(f"release policy 'demo-app': measurement {measurement}")
        self.note(
            f"{DB_SECRET} (password), {VOLUME_KEY} (AES-256), demo/tls/server (key + certificate "
            "issued at release by the broker's CA): all never-export"
        )
        try:
            admin.export(DB_SECRET)
        except KbsError as exc:
            self.note(f"an admin asking for {DB_SECRET}: {exc.status} {exc.kind}")
            self.proved("admins manage these secrets but can never read them")
        else:
            raise CoveError("demo: the broker let an admin read a never-export secret")

    def run_enclave(self, app: Path, admin, measurement: str) -> None:
        self.step("Run the enclave: the runtime attests it, then installs the secrets, then starts the program")
        done = self.cove("run", "/bin/demo-app", cwd=app, check=False)
        if done.returncode != 0:
            raise CoveError(f"demo: the enclave did not run: {done.stderr.strip()}")
        for line in done.stdout.splitlines():
            click.echo(line)
        releases = [r for r in admin.audit(action="release") if r["outcome"] == "ok"]
        for row in releases:
            self.note(f"audit: released {row['resource']} to measurement {row['measurement'][:16]}...")
        self.proved("the broker checked platform-signed evidence bound to its nonce and the runtime's fresh key,")
        self.proved(f"and released each secret only to measurement {measurement[:16]}..., as a JWE to that key")
        data = app / "run" / "data"
        if not data.is_dir():
            raise CoveError(f"demo: the enclave wrote no encrypted volume under {data}")
        self.step("Look at the volume from the host")
        raw = b"".join(p.read_bytes() for p in data.rglob("*") if p.is_file())
        leaked = b"alice owes bob" in raw
        self.note(f"{sum(1 for p in data.rglob('*') if p.is_file())} files, {len(raw)} bytes under {data}")
        if leaked:
            raise CoveError("demo: the volume's plaintext is visible on the host")
        self.proved(
            "the host's disk holds only ciphertext; the volume key came from the broker after "
            "attestation and is never written to disk"
        )

    def changed_enclave(self, url: str, ca: Path, admin) -> None:
        self.step("Change one byte of the program and run it again")
        changed = self.build_enclave(url, ca, "app-changed", marker="changed")
        self.note(f"new measurement {self.measurement(changed)[:16]}...")
        done = self.cove("run", "/bin/demo-app", cwd=changed, check=False)
        if done.returncode == 0 or "[enclave]" in done.stdout:
            raise CoveError("demo: a changed enclave was given its secrets")
        self.note(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
        self.proved("a different enclave is refused before its program starts")


@click.command()
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep everything in DIR (default: a temporary folder, removed afterwards).",
)
def demo(folder: Path | None) -> None:
    """Build an enclave, attest it to a local key broker, provision secrets, show what was proven."""
    keep = folder is not None
    target = folder or Path(tempfile.mkdtemp(prefix="cove-demo-"))
    try:
        Demo(target.resolve(), keep).run()
    finally:
        if not keep:
            shutil.rmtree(target, ignore_errors=True)


COMMANDS = (demo,)
