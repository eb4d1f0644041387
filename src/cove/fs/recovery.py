"""Opening a volume after a crash: bring its host files to the state its index records.

A commit can stop between any two of its steps (see :mod:`cove.fs.volume`).
Once the anchor has picked the root, every host file under ``files/`` is
checked against that root's index: a file whose undo log returns it to the
root MAC the index records is rolled back, a file already at that MAC has its
pending-write flag cleared, files unlinked before (or created after) the last
commit are deleted, and anything else is reported. This is kept apart from the
volume's operations because it runs once, on open, and touches only host files.
"""

from __future__ import annotations

import hmac
import os

from cove.fs import journal
from cove.fs.errors import FileIntegrityError
from cove.fs.index import Node
from cove.fs.layout import HAS_PENDING_WRITE, HEADER, NODE_SIZE, Header, node_count
from cove.fs.protected_file import read_header
from cove.fs.volume_format import parse_id, tag_ok


def discard(path: str) -> None:
    """Delete a host file if it is there (and if the volume folder is writable)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass  # a read-only volume folder: leave it


def scan(
    files_dir: str, ids: dict[str, Node], drop: set[str], version: int, name_key: bytes, read_only: bool = False
) -> tuple[list[str], list[str]]:
    """Recover files from an interrupted commit; find missing, leftover and foreign files.

    ``ids`` and ``drop`` are the committed index's files and the IDs it drops,
    ``version`` its version. Returns (problems, paths of recovered files).
    ``read_only``: change nothing; a file with an interrupted write is a
    problem, leftovers of the commit are passed over.
    """
    problems: list[str] = []
    recovered: list[str] = []
    seen = set()
    for sub in sorted(os.listdir(files_dir)) if os.path.isdir(files_dir) else ():
        subdir = os.path.join(files_dir, sub)
        if not os.path.isdir(subdir):
            problems.append(f"unexpected entry files/{sub} (added from outside)")
            continue
        names = sorted(os.listdir(subdir))
        present = set(names)
        for name in names:
            full = os.path.join(subdir, name)
            if name.endswith(journal.RECOVERY_SUFFIX):
                if name[: -len(journal.RECOVERY_SUFFIX)] not in present and not read_only:
                    discard(full)  # the log of a file that is gone
                continue
            if name.endswith(".cove-new") and name.startswith("."):
                if not read_only:
                    discard(full)  # a creation a crash interrupted
                continue
            seen.add(name)
            if name in ids and read_only:
                if pending(ids[name], full):
                    problems.append(
                        f"{ids[name].path()}: a write was interrupted; a writable open (a mount) "
                        "finishes or rolls it back"
                    )
                continue
            if name in ids:
                if resolve(ids[name], full):
                    recovered.append(ids[name].path())
                continue
            parsed = parse_id(name)
            if name in drop or (parsed and parsed[0] > version and tag_ok(name_key, *parsed)):
                if read_only:
                    continue
                discard(full)  # unlinked before, or created after, the last commit
                discard(journal.recovery_path(full))
            else:
                problems.append(
                    f"unexpected file files/{sub}/{name} (added from outside; "
                    "it is not part of the volume and cannot be seen)"
                )
    for file_id, node in ids.items():
        if file_id not in seen:
            problems.append(f"{node.path()}: its host file is missing (deleted from outside)")
    return problems, recovered


def _trim(full: str, node: Node) -> None:
    need = node_count(node.size) * NODE_SIZE
    if os.path.getsize(full) > need:
        os.truncate(full, need)


def _plan(node: Node, full: str) -> tuple[str | None, Header | None]:
    """What recovery would do to one file: "rollback", "finish", "stale" (a log to drop) or None."""
    try:
        header = read_header(full)
    except (FileIntegrityError, OSError):
        return None, None  # reported when the file is opened
    if node.mac is None:  # not a file of the index
        return None, header
    logged = journal.logged_metadata(full)
    flagged = bool(header.flags & HAS_PENDING_WRITE)
    if flagged and logged is not None and hmac.compare_digest(logged[HEADER.size - 17 : HEADER.size - 1], node.mac):
        return "rollback", header
    if hmac.compare_digest(header.mac, node.mac) and logged is not None:
        return "finish", header  # the index recorded this state but the commit was not finished
    if not flagged and os.path.exists(journal.recovery_path(full)):
        return "stale", header
    return None, header


def pending(node: Node, full: str) -> bool:
    """Whether a writable open would roll back or finish an interrupted write of this file."""
    return _plan(node, full)[0] in ("rollback", "finish")


def resolve(node: Node, full: str) -> bool:
    """Bring one file to the state the index records, if its undo log can; True if it did."""
    action, header = _plan(node, full)
    try:
        if action == "rollback":
            journal.recover(full)  # back to the state the index records
            _trim(full, node)
            discard(journal.recovery_path(full))
            return True
        if action == "finish" and header is not None:
            if header.flags & HAS_PENDING_WRITE:
                with open(full, "r+b") as f:
                    f.seek(HEADER.size - 1)
                    f.write(bytes([header.flags & ~HAS_PENDING_WRITE]))
            _trim(full, node)
            discard(journal.recovery_path(full))
            return True
        if action == "stale":
            discard(journal.recovery_path(full))  # an empty or stale log
    except (OSError, FileIntegrityError):
        pass  # read-only folder or a damaged log: the file reports its state when opened
    return False
