"""The commented cove.toml that `cove new` writes."""

TEMPLATE = """\
# cove.toml: the configuration of the enclave "{name}".
# Everything below is measured by `cove build`: change it, then rebuild.
# Reference: docs/config.md

[enclave]
name = "{name}"
product_id = 0        # 0..65535; with the signer, names the product (like SGX ISVPRODID)
svn = 0               # security version number 0..65535; raise it when you fix a flaw
debug = false         # true allows `cove run --debug` shells; verifiers refuse debug enclaves by default
backend = "auto"      # auto | sim | vm   (auto: the strongest this host runs without a vm build; vm: a measured micro-VM)

[resources]
memory = "512M"       # memory limit for all processes of the enclave (K, M, G suffixes)
max_processes = 64    # processes and threads
max_open_files = 1024 # per process

[process]
# Path prefixes `cove run PROGRAM` accepts: a prefix ending in / admits a folder,
# anything else exactly one program.
entry_points = ["/bin/", "/usr/bin/"]
cwd = "/"             # working directory inside the enclave
user = "root"         # "root", a name from the image's /etc/passwd, or "UID:GID"

[env]
# The enclave's environment is built only from here; nothing else of the host's enters.
default = {{ PATH = "/usr/local/bin:/usr/bin:/bin", HOME = "/root", LANG = "C.UTF-8" }}
passthrough = []      # names of host variables copied in, e.g. ["TERM"]

[network]
mode = "none"         # none (no IP sockets at all) | loopback (a private loopback) | host

# The measured image is always mounted read-only at /. More mounts:
[[mounts]]
target = "/tmp"
type = "tmpfs"        # image | tmpfs | host
options = {{ size = "64M" }}

# A folder of the host, read-only unless writable = true. It is measured, so a
# verifier sees that the enclave reads (or writes) it.
# [[mounts]]
# target = "/data"
# type = "host"
# source = "/srv/data"
# writable = false

# An encrypted, integrity- and rollback-protected volume (docs/secure-fs.md):
# plain files inside, only ciphertext on the host (under run/ by default).
# key: seal:mrenclave | seal:mrsigner | kbs:REPO/TYPE/TAG | file:PATH | insecure:HEX (debug only)
# [[mounts]]
# target = "/data"
# type = "encrypted"
# key = "seal:mrsigner"

# Secrets from a key broker, installed after the enclave has been attested and
# before the program starts (docs/kbs.md).
# [attestation]
# kbs = "https://kbs.example:8080"
# ca = "/etc/cove/kbs-ca.pem"     # or, for a broker in an enclave (RA-TLS): kbs_policy = "/etc/cove/kbs.toml"
#
# [[secrets]]
# name = "db-password"
# resource = "prod/db/password"
# target = "env:DB_PASSWORD"     # or file:/run/secrets/NAME, or mount:/data (an encrypted mount's key)
"""


def config_template(name: str) -> str:
    return TEMPLATE.format(name=name)
