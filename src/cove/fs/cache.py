"""A bounded LRU cache of decrypted tree nodes.

Memory stays bounded for files of any size: only ``capacity`` nodes (plus the
short chain of MHT nodes being walked) are held. An MHT node is never evicted
while one of its children is cached, because a child's key and MAC live in
it; the children count makes that check O(1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from cove.fs.layout import NODE_SIZE


class Node:
    """One decrypted data or MHT node."""

    __slots__ = ("phys", "num", "is_mht", "buf", "dirty", "children", "parent")

    def __init__(self, phys: int, num: int, is_mht: bool, parent: Node | None = None, buf: bytearray | None = None):
        self.phys = phys
        self.parent = parent  # the MHT node holding this node's key; pinned while we live
        self.num = num  # logical data-node or MHT-node number
        self.is_mht = is_mht
        self.buf = bytearray(NODE_SIZE) if buf is None else buf  # plaintext
        self.dirty = False
        self.children = 0  # cached children (MHT nodes only)


class NodeCache:
    """LRU of nodes keyed by physical node number; the root MHT is kept elsewhere."""

    def __init__(self, capacity: int):
        self.capacity = max(8, capacity)
        self._nodes: OrderedDict[int, Node] = OrderedDict()

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, phys: int) -> bool:
        return phys in self._nodes

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self._nodes.values()))

    def get(self, phys: int) -> Node | None:
        node = self._nodes.get(phys)
        if node is not None:
            self._nodes.move_to_end(phys)
        return node

    def loaded(self, phys: int) -> Node:
        """A node just loaded (KeyError if it is not cached), without touching the LRU order."""
        return self._nodes[phys]

    def add(self, node: Node) -> None:
        self._nodes[node.phys] = node

    def remove(self, phys: int) -> None:
        del self._nodes[phys]

    def over(self) -> bool:
        return len(self._nodes) > self.capacity

    def pick_victims(self, target: int) -> list[Node]:
        """Remove least recently used childless nodes until ``target`` remain.

        The parent's children count is decremented so it may go in the same
        batch.
        """
        victims: list[Node] = []
        progress = True
        while len(self._nodes) > target and progress:
            progress = False
            for phys, node in list(self._nodes.items()):
                if len(self._nodes) <= target:
                    break
                if node.children:
                    continue
                del self._nodes[phys]
                assert node.parent is not None  # only the root has none, and it is not cached
                node.parent.children -= 1
                victims.append(node)
                progress = True
        return victims

    def clear(self) -> None:
        self._nodes.clear()
