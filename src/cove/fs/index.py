"""A volume's index: its whole namespace, held in memory and sealed in the root.

The index is a tree of folders, files and symlinks with their modes, owners
and times; each file entry names its host file ID and the root MAC of its
committed state. It lives here, apart from the root file's format and from the
operations on it, because it is plain data: :class:`Node` is both the CBOR
record the root seals and the runtime state (inode, open handle) the
operations keep on it. :class:`KeyPolicy` is the header's record of how the
volume's key is found again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cove.fs.protected_file import ProtectedFile


@dataclass(frozen=True)
class KeyPolicy:
    """How a volume's KEK is found again: the normalized key source and the svn it was sealed at."""

    source: str
    svn: int = 0

    @classmethod
    def of(cls, source_text: str, svn: int | None = None) -> KeyPolicy:
        from cove.fs.keys import parse

        source = parse(source_text)
        if source.kind in ("file", "insecure"):  # where the key lives is not part of the volume
            return cls(source.kind, 0)
        return cls(source.text, (svn or 0) if source.sealed else 0)

    @classmethod
    def from_cbor(cls, item: dict[str, Any]) -> KeyPolicy:
        return cls(item["source"], item["svn"])

    def to_cbor(self) -> dict[str, Any]:
        return {"source": self.source, "svn": self.svn}


KeyFor = Callable[[KeyPolicy], bytes]


class Node:
    """A folder, file or symlink of the index, with its runtime state."""

    __slots__ = (
        "kind",
        "mode",
        "uid",
        "gid",
        "mtime",
        "ctime",
        "id",
        "mac",
        "size",
        "children",
        "target",
        "ino",
        "parent",
        "name",
        "lookups",
        "handle",
        "opens",
        "dirty",
        "linked",
    )

    def __init__(self, kind: str, mode: int, uid: int = 0, gid: int = 0, now: int | None = None):
        now = time.time_ns() if now is None else now
        self.kind = kind  # "d", "f" or "l"
        self.mode = mode  # full st_mode
        self.uid, self.gid = uid, gid
        self.mtime = self.ctime = now
        self.id: str | None = None
        self.mac: bytes | None = None
        self.size = 0
        self.children: dict[bytes, Node] | None = {} if kind == "d" else None
        self.target: bytes | None = None
        self.ino = 0
        self.parent: Node | None = None
        self.name = b""
        self.lookups = 0
        self.handle: ProtectedFile | None = None
        self.opens = 0
        self.dirty = False
        self.linked = True

    @property
    def is_dir(self) -> bool:
        return self.kind == "d"

    @property
    def entries(self) -> dict[bytes, Node]:
        """A folder's children by name; NotADirectoryError for a file or symlink."""
        if self.children is None:
            raise NotADirectoryError(f"{self.path()} is not a folder")
        return self.children

    def path(self) -> str:
        parts = []
        node = self
        while node.parent is not None:
            parts.append(node.name.decode("utf-8", "replace"))
            node = node.parent
        return "/" + "/".join(reversed(parts))

    def to_cbor(self) -> dict[str, Any]:
        item: dict[str, Any] = {
            "k": self.kind,
            "m": self.mode,
            "u": self.uid,
            "g": self.gid,
            "t": self.mtime,
            "c": self.ctime,
        }
        if self.kind == "f":
            item.update(i=self.id, h=self.mac, s=self.size)
        elif self.kind == "l":
            item["l"] = self.target
        else:
            item["e"] = {name: child.to_cbor() for name, child in sorted(self.entries.items())}
        return item

    @classmethod
    def from_cbor(cls, item: dict[str, Any]) -> Node:
        node = cls(item["k"], item["m"], item["u"], item["g"], item["t"])
        node.ctime = item["c"]
        if node.kind == "f":
            node.id, node.mac, node.size = item["i"], item["h"], item["s"]
        elif node.kind == "l":
            node.target = item["l"]
        elif node.kind == "d":
            for name, sub in item["e"].items():
                child = cls.from_cbor(sub)
                child.parent, child.name = node, name
                node.entries[name] = child
        else:
            raise ValueError(f"unknown node kind {node.kind!r}")
        return node
