"""The Merkle tree of a protected file: finding, decrypting, sealing nodes.

Plain content offsets map to data nodes; each data node's key and MAC live
in an MHT node, each MHT node's in its parent, the root's in the metadata
node. This module keeps the decrypted nodes (through :class:`NodeCache`) and
turns dirty ones into ciphertext runs; *when* and *how safely* runs reach the
disk is the caller's business (``write_back``), which keeps the crash
protocol in one place.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cove.fs import crypto
from cove.fs.cache import Node, NodeCache
from cove.fs.errors import FileIntegrityError
from cove.fs.layout import (
    ATTACHED_DATA_NODES,
    KEY_SIZE,
    MAC_SIZE,
    PAIR_SIZE,
    MD_USER_DATA_SIZE,
    NODE_SIZE,
    data_node_of,
    data_node_start,
    data_phys,
    data_slot,
    describe,
    mht_exists,
    mht_of_data,
    mht_parent,
    mht_phys,
    mht_slot,
    node_count,
)

SEALED = NODE_SIZE + MAC_SIZE
_ZEROS = memoryview(bytes(NODE_SIZE))
READAHEAD = 64  # nodes read in one go when access is sequential
DIRECT_BATCH = 256  # whole nodes sealed per write_back on the append path (1 MiB)

Run = tuple[int, memoryview]  # (first physical node, ciphertext of consecutive nodes)


class Tree:
    """Decrypted view of the data and MHT nodes of one protected file."""

    def __init__(
        self,
        fd: int,
        size: int,
        root_key: bytes,
        root_mac: bytes,
        capacity: int,
        write_back: Callable[[list[Run]], None],
        before_read: Callable[[], None] = lambda: None,
    ):
        self.fd = fd
        self.before_read = before_read  # waits for writes still in flight
        self.size = size
        self.root_key = root_key
        self.root_mac = root_mac
        self.cache = NodeCache(capacity)
        self.root = Node(1, 0, True)
        self.write_back = write_back
        self._next_seq = -1  # data node that would continue a sequential read
        self._last_end = -1  # where the previous read call ended
        self._ahead = False  # this read call continues the previous one: read ahead
        if size > MD_USER_DATA_SIZE:
            self._load_root()

    # -- lookup ---------------------------------------------------------------

    def _load_root(self) -> None:
        sealed = bytearray(self._pread(1, 1)) + self.root_mac
        try:
            crypto.open_sealed(self.root_key, sealed, self.root.buf)
        except crypto.InvalidTag:
            raise FileIntegrityError("root MHT node (node 1) MAC mismatch") from None

    def _pread(self, first: int, count: int) -> bytes:
        want = count * NODE_SIZE
        self.before_read()
        data = os.pread(self.fd, want, first * NODE_SIZE)
        if len(data) != want:
            raise FileIntegrityError(f"file truncated: {describe(first + len(data) // NODE_SIZE)} is missing")
        return data

    def mht(self, m: int) -> Node:
        """MHT node ``m``, loaded (and checked) or created as needed."""
        if m == 0:
            return self.root
        phys = mht_phys(m)
        node = self.cache.get(phys)
        if node is not None:
            return node
        parent = self.mht(mht_parent(m))
        if not mht_exists(m, self.size):
            node = Node(phys, m, True, parent)
            self.cache.add(node)
            parent.children += 1
            return node
        self._load_run(phys, 1)
        return self.cache.loaded(phys)

    def data(self, d: int) -> Node:
        """Data node ``d``, loaded (and checked) or, past the end, created zeroed."""
        phys = data_phys(d)
        node = self.cache.get(phys)
        if node is not None:
            self._next_seq = d + 1
            return node
        parent = self.mht(mht_of_data(d))
        if data_node_start(d) >= self.size:
            node = Node(phys, d, False, parent)
            self.cache.add(node)
            parent.children += 1
            return node
        count = 1
        if self._ahead and d == self._next_seq:
            limit = min(node_count(self.size), phys + min(READAHEAD, self.cache.capacity // 4))
            while phys + count < limit and (phys + count) not in self.cache:
                count += 1
        self._next_seq = d + 1
        self._load_run(phys, count)
        return self.cache.loaded(phys)

    def _load_run(self, first: int, count: int) -> None:
        """Read ``count`` consecutive nodes in one call, decrypt and cache them.

        MHT nodes first (data nodes need their keys), then data nodes from the
        last to the first, so each node's tag can be placed right after its
        ciphertext in the read buffer without copying the node.
        """
        buf = bytearray(count * NODE_SIZE + MAC_SIZE)
        view = memoryview(buf)
        view[: count * NODE_SIZE] = self._pread(first, count)
        nodes = []
        for i in range(count):
            phys = first + i
            rel = phys - 1
            if rel % (1 + ATTACHED_DATA_NODES) == 0:
                m = rel // (1 + ATTACHED_DATA_NODES)
                parent = self.mht(mht_parent(m))
                node = Node(phys, m, True, parent)
                slot = mht_slot(m)
                sealed = bytearray(view[i * NODE_SIZE : (i + 1) * NODE_SIZE])
                sealed += parent.buf[slot + KEY_SIZE : slot + KEY_SIZE + MAC_SIZE]
                self._open(parent.buf[slot : slot + KEY_SIZE], sealed, node)
                self.cache.add(node)
                parent.children += 1
            else:
                m, k = divmod(rel, 1 + ATTACHED_DATA_NODES)
                nodes.append((i, Node(phys, m * ATTACHED_DATA_NODES + k - 1, False)))
        for i, node in reversed(nodes):
            parent = node.parent = self.mht(mht_of_data(node.num))
            slot = data_slot(node.num)
            end = (i + 1) * NODE_SIZE
            view[end : end + MAC_SIZE] = parent.buf[slot + KEY_SIZE : slot + KEY_SIZE + MAC_SIZE]
            self._open(parent.buf[slot : slot + KEY_SIZE], view[i * NODE_SIZE : end + MAC_SIZE], node)
            self.cache.add(node)
            parent.children += 1

    @staticmethod
    def _open(key: crypto.Buffer, sealed: crypto.Buffer, node: Node) -> None:
        try:
            crypto.open_sealed(bytes(key), sealed, node.buf)
        except crypto.InvalidTag:
            raise FileIntegrityError(f"{describe(node.phys)} MAC mismatch") from None

    # -- modification -----------------------------------------------------------

    def mark_dirty(self, node: Node) -> None:
        """A dirty node makes every MHT node above it dirty (their entries change)."""
        up: Node | None = node
        while up is not None and not up.dirty:
            up.dirty = True
            up = up.parent

    def read_into(self, parts: list[memoryview | bytes], offset: int, end: int) -> None:
        """Append views of content bytes [offset, end) (all >= 3072) to ``parts``.

        Reading ahead into the cache happens only when this call continues
        where the previous one ended (a random read never pays for it).
        """
        self._ahead = offset == self._last_end
        self._last_end = end
        while offset < end:
            if self.cache.over():
                self.evict()
            d = data_node_of(offset)
            o = offset - data_node_start(d)
            if o == 0 and end - offset >= 2 * NODE_SIZE:
                count = self._uncached_run(d, min((end - offset) // NODE_SIZE, DIRECT_BATCH))
                if count >= 2:  # whole nodes nobody holds: decrypted straight into one buffer
                    parts.append(self._open_direct(d, count))
                    offset += count * NODE_SIZE
                    self._next_seq = -1  # no read-ahead into the cache for the next partial node
                    continue
            n = min(NODE_SIZE - o, end - offset)
            node = self.data(d)
            parts.append(memoryview(node.buf)[o : o + n])
            offset += n

    def write_from(self, offset: int, src: memoryview | None, length: int) -> None:
        """Write ``src`` (or zeros) at content offset ``offset`` (>= 3072)."""
        self._ahead = False
        pos = 0
        cache = self.cache
        while pos < length:
            if cache.over():
                self.evict()
            d = (offset - MD_USER_DATA_SIZE) // NODE_SIZE
            start = MD_USER_DATA_SIZE + d * NODE_SIZE
            o = offset - start
            n = min(NODE_SIZE - o, length - pos)
            if n == NODE_SIZE and start >= self.size and length - pos >= 2 * NODE_SIZE:
                # whole nodes past the end: sealed straight into write buffers, never cached
                count = min((length - pos) // NODE_SIZE, DIRECT_BATCH)
                self._seal_direct(d, count, src[pos : pos + count * NODE_SIZE] if src is not None else None)
                offset += count * NODE_SIZE
                pos += count * NODE_SIZE
                self.size = offset
                continue
            if n == NODE_SIZE and start >= self.size:
                # a whole node past the end: no lookup, no read, one copy
                parent = self.mht(d // ATTACHED_DATA_NODES)
                buf = bytearray(src[pos : pos + NODE_SIZE]) if src is not None else None
                node = Node(data_phys(d), d, False, parent, buf)
                cache.add(node)
                parent.children += 1
                node.dirty = True
                if not parent.dirty:
                    self.mark_dirty(parent)
            else:
                node = self.data(d)
                node.buf[o : o + n] = src[pos : pos + n] if src is not None else _ZEROS[:n]
                self.mark_dirty(node)
            offset += n
            pos += n
            if offset > self.size:
                self.size = offset

    def _uncached_run(self, d0: int, limit: int) -> int:
        """How many data nodes from ``d0`` (at most ``limit``) are not in the cache."""
        cache = self.cache
        count = 0
        while count < limit and data_phys(d0 + count) not in cache:
            count += 1
        return count

    def _open_direct(self, d0: int, count: int) -> memoryview:
        """Decrypt ``count`` data nodes from ``d0`` into a new buffer, without caching them."""
        out = bytearray(count * NODE_SIZE)
        dest = memoryview(out)
        open_sealed = crypto.open_sealed
        aead, iv, fast = crypto.AESGCM, crypto.IV, crypto.FAST
        i = 0
        while i < count:
            d = d0 + i
            group = min(count - i, ATTACHED_DATA_NODES - d % ATTACHED_DATA_NODES)
            pbuf = memoryview(self.mht(d // ATTACHED_DATA_NODES).buf)
            phys = data_phys(d)
            raw = bytearray(group * NODE_SIZE + MAC_SIZE)
            view = memoryview(raw)
            view[: group * NODE_SIZE] = self._pread(phys, group)
            slot = (d % ATTACHED_DATA_NODES) * PAIR_SIZE + (group - 1) * PAIR_SIZE
            for j in range(group - 1, -1, -1):  # last first: each tag goes right after its ciphertext
                at = j * NODE_SIZE
                view[at + NODE_SIZE : at + SEALED] = pbuf[slot + KEY_SIZE : slot + PAIR_SIZE]
                key = pbuf[slot : slot + KEY_SIZE]
                target = dest[(i + j) * NODE_SIZE : (i + j + 1) * NODE_SIZE]
                try:
                    if fast:
                        aead(key).decrypt_into(iv, view[at : at + SEALED], None, target)
                    else:
                        open_sealed(bytes(key), view[at : at + SEALED], target)
                except crypto.InvalidTag:
                    raise FileIntegrityError(f"{describe(phys + j)} MAC mismatch") from None
                slot -= PAIR_SIZE
            i += group
        return dest

    def _seal_direct(self, d0: int, count: int, src: memoryview | None) -> None:
        """Seal ``count`` whole data nodes from ``d0`` (all past the end) and hand them to write_back.

        Their keys and MACs go into their MHT nodes (which stay cached and
        dirty), exactly as if the nodes had been cached and evicted.
        """
        keys = memoryview(crypto.random_keys(count))
        zeros = _ZEROS
        seal = crypto.seal
        aead, iv, fast = crypto.AESGCM, crypto.IV, crypto.FAST
        runs: list[Run] = []
        i = 0
        while i < count:
            d = d0 + i
            group = min(count - i, ATTACHED_DATA_NODES - d % ATTACHED_DATA_NODES)
            parent = self.mht(d // ATTACHED_DATA_NODES)
            pbuf = parent.buf
            buf = bytearray(group * NODE_SIZE + MAC_SIZE)
            view = memoryview(buf)
            slot = (d % ATTACHED_DATA_NODES) * PAIR_SIZE
            for j in range(group):
                at = j * NODE_SIZE
                k = (i + j) * KEY_SIZE
                key = keys[k : k + KEY_SIZE]
                plain = src[(i + j) * NODE_SIZE : (i + j + 1) * NODE_SIZE] if src is not None else zeros
                if fast:  # the tag spills into the next, unsealed slot
                    aead(key).encrypt_into(iv, plain, None, view[at : at + SEALED])
                else:
                    seal(key, plain, view[at : at + SEALED])
                pbuf[slot : slot + KEY_SIZE] = key
                pbuf[slot + KEY_SIZE : slot + PAIR_SIZE] = view[at + NODE_SIZE : at + SEALED]
                slot += PAIR_SIZE
            self.mark_dirty(parent)
            if parent.phys in self.cache:
                self.cache.get(parent.phys)  # recently used: keep it over the nodes of older groups
            runs.append((data_phys(d), view[: group * NODE_SIZE]))
            i += group
        self.write_back(runs)

    def shrink(self, size: int) -> None:
        """Forget nodes past the new end; their MHT entries simply go stale."""
        self.size = size
        for node in self.cache:
            gone = (not mht_exists(node.num, size)) if node.is_mht else data_node_start(node.num) >= size
            if gone:
                self.cache.remove(node.phys)
        self.root.children = 0
        for node in self.cache:
            node.children = 0
        for node in self.cache:
            assert node.parent is not None  # only the root has none, and it is not cached
            node.parent.children += 1
        if size <= MD_USER_DATA_SIZE:
            self.root = Node(1, 0, True)
        self._next_seq = -1

    # -- sealing ------------------------------------------------------------------

    def evict(self) -> None:
        """Drop a batch of least recently used nodes, writing back dirty ones."""
        target = self.cache.capacity - max(1, self.cache.capacity // 8)
        victims = self.cache.pick_victims(target)
        dirty = [n for n in victims if n.dirty]
        if dirty:
            self.write_back(self.seal(dirty, with_root=False))

    def dirty_nodes(self) -> list[Node]:
        return [n for n in self.cache if n.dirty]

    def seal(self, nodes: list[Node], with_root: bool) -> list[Run]:
        """Encrypt ``nodes`` under fresh keys, record keys and MACs in parents.

        Children are sealed before parents (data nodes, then MHT nodes by
        decreasing number, then the root). Ciphertext is laid out in runs of
        consecutive physical nodes so each run is one write.
        """
        if with_root and self.root.dirty:
            nodes = nodes + [self.root]
        nodes.sort(key=lambda n: n.phys)
        runs: list[tuple[int, int, bytearray]] = []
        where: dict[int, tuple[memoryview, int]] = {}
        i = 0
        while i < len(nodes):
            j = i + 1
            while j < len(nodes) and nodes[j].phys == nodes[j - 1].phys + 1:
                j += 1
            buf = bytearray((j - i) * NODE_SIZE + MAC_SIZE)
            view = memoryview(buf)
            runs.append((nodes[i].phys, j - i, buf))
            for k in range(i, j):
                where[nodes[k].phys] = (view, (k - i) * NODE_SIZE)
            i = j
        data = [n for n in nodes if not n.is_mht]
        mhts = sorted((n for n in nodes if n.is_mht), key=lambda n: n.num, reverse=True)
        keys = memoryview(crypto.random_keys(len(nodes)))
        k = 0
        seal = crypto.seal
        for node in data:  # ascending: each tag spills into the next, unsealed slot
            view, at = where[node.phys]
            key = keys[k : k + KEY_SIZE]
            k += KEY_SIZE
            seal(key, node.buf, view[at : at + SEALED])
            assert node.parent is not None  # a data node always has its MHT node
            pbuf = node.parent.buf
            slot = (node.num % ATTACHED_DATA_NODES) * PAIR_SIZE
            pbuf[slot : slot + KEY_SIZE] = key
            pbuf[slot + KEY_SIZE : slot + PAIR_SIZE] = view[at + NODE_SIZE : at + SEALED]
            node.dirty = False
        tmp = bytearray(SEALED)
        for node in mhts:
            view, at = where[node.phys]
            node_key = bytes(keys[k : k + KEY_SIZE])
            k += KEY_SIZE
            crypto.seal(node_key, node.buf, tmp)
            view[at : at + NODE_SIZE] = tmp[:NODE_SIZE]
            tag = bytes(tmp[NODE_SIZE:])
            if node is self.root:
                self.root_key, self.root_mac = node_key, tag
            else:
                parent = node.parent
                assert parent is not None  # only the root has none
                slot = mht_slot(node.num)
                parent.buf[slot : slot + KEY_SIZE] = node_key
                parent.buf[slot + KEY_SIZE : slot + KEY_SIZE + MAC_SIZE] = tag
            node.dirty = False
        return [(first, memoryview(buf)[: count * NODE_SIZE]) for first, count, buf in runs]
