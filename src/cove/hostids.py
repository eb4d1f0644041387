"""The host ids an enclave started by root runs as: a subordinate range, never host root.

Sysctls, /proc files and host files are checked by host uid, and dropping
capabilities does not change a uid, so an enclave whose root is host root can
still write the host's global sysctls. As Podman does for rootful user
namespaces, a root-started enclave therefore runs as ids from a subordinate
range: the ``cove`` entry of /etc/subuid and /etc/subgid (scripts/setup adds
one), or ``COVE_ID_RANGE=START:COUNT`` for both. The enclave's user (whatever
[process] user names inside) is host uid START and gid START; the rest of the
range is reserved. An enclave started by any other user runs as that user.

The FUSE servers of an enclave store ids relative to that host user: stored
id N is host id START + N (or, for a user, N = 0 is that user), so a volume
works the same whoever starts the enclave.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cove.errors import SetupError

NAME = "cove"
ENVIRONMENT = "COVE_ID_RANGE"
MIN_COUNT = 65536  # what scripts/setup reserves, as Podman does
SUBUID, SUBGID = "/etc/subuid", "/etc/subgid"
HINT = "run scripts/setup as root (it adds a `cove` entry to /etc/subuid and /etc/subgid)"


@dataclass(frozen=True)
class IdRange:
    """Stored ids 0..count-1 are host uids uid.. and host gids gid..; the enclave runs as (uid, gid)."""

    uid: int
    gid: int
    count: int

    def host(self, uid: int, gid: int) -> tuple[int, int]:
        """The host ids of stored ids (ids outside the range are left alone)."""
        return (self.uid + uid if 0 <= uid < self.count else uid, self.gid + gid if 0 <= gid < self.count else gid)

    def inside(self, uid: int, gid: int) -> tuple[int, int]:
        """The stored ids of host ids (ids outside the range are left alone)."""
        return (
            uid - self.uid if self.uid <= uid < self.uid + self.count else uid,
            gid - self.gid if self.gid <= gid < self.gid + self.count else gid,
        )


def _entry(path: str, name: str) -> tuple[int, int] | None:
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SetupError(f"cannot read {path}: {exc.strerror}", HINT) from None
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] == name:
            try:
                return int(fields[1]), int(fields[2])
            except ValueError:
                raise SetupError(f"{path}: the {name} entry is not NAME:START:COUNT", HINT) from None
    return None


def _checked(start: int, count: int, where: str) -> tuple[int, int]:
    if start < 1 or count < MIN_COUNT or start + count > 0xFFFFFFFF:
        raise SetupError(
            f"{where}: the enclave id range {start}:{count} must start above 0 and hold at least {MIN_COUNT} ids", HINT
        )
    return start, count


def root_range() -> IdRange:
    """The range enclaves started by root run in; a SetupError if none is configured."""
    configured = os.environ.get(ENVIRONMENT)
    if configured:
        start_text, _, count_text = configured.partition(":")
        try:
            start_id, count_ids = _checked(int(start_text), int(count_text), ENVIRONMENT)
        except ValueError:
            raise SetupError(f"{ENVIRONMENT} must be START:COUNT, not {configured!r}") from None
        return IdRange(start_id, start_id, count_ids)
    uids, gids = _entry(SUBUID, NAME), _entry(SUBGID, NAME)
    if uids is None or gids is None:
        missing = SUBUID if uids is None else SUBGID
        raise SetupError(f"enclaves started by root run as subordinate ids, and {missing} has no {NAME} entry", HINT)
    uid, count = _checked(*uids, where=SUBUID)
    gid, gcount = _checked(*gids, where=SUBGID)
    return IdRange(uid, gid, min(count, gcount))


def enclave_range() -> IdRange:
    """The ids a sandbox started by this process runs as: the subordinate range for root, else the caller."""
    return root_range() if os.geteuid() == 0 else IdRange(os.getuid(), os.getgid(), 1)
