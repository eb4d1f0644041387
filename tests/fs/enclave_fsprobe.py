"""Runs inside an enclave (Debian's python3.11) against an encrypted mount.

    fsprobe.py posix ROOT              exercise POSIX calls; print a JSON report
    fsprobe.py persisted ROOT          check what `posix` left; print a JSON report
    fsprobe.py readall ROOT            read every file; print {path: "sha256:..." | "errno:NAME"}
    fsprobe.py writer ROOT SEED        atomic replaces and small in-place writes with fsync, forever
    fsprobe.py sqlite-writer DB        one row per transaction, forever
    fsprobe.py sqlite-check DB         integrity_check and the row count, as JSON

The writers print ``ready``, then ``begin ...``/``commit ...`` lines around
each durable step, flushed, so a test can kill the writer or the FUSE
server at any point and know the allowed states.
"""

import errno
import hashlib
import json
import os
import random
import sqlite3
import sys


def out(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def digest(data):
    return hashlib.sha256(data).hexdigest()


def expect_errno(code, fn, *args):
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno == code
    return False


def posix(root):
    r = {}
    p = lambda *parts: os.path.join(root, *parts)  # noqa: E731
    os.mkdir(p("dir"))
    os.makedirs(p("dir", "sub", "deeper"))
    with open(p("dir", "hello.txt"), "w") as f:
        f.write("hello, enclave\n")
    with open(p("dir", "hello.txt")) as f:
        r["read"] = f.read()
    # random access, holes, extension and truncation
    fd = os.open(p("big.bin"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    r["excl"] = expect_errno(errno.EEXIST, os.open, p("big.bin"), os.O_RDWR | os.O_CREAT | os.O_EXCL)
    block = bytes(range(256)) * 16
    for i in range(300):
        os.pwrite(fd, block, i * 4096)
    os.pwrite(fd, b"tail", 5_000_000)  # a hole up to 5 MB
    r["hole"] = os.pread(fd, 8, 3_000_000) == bytes(8)
    r["size_after_hole"] = os.fstat(fd).st_size
    os.pwrite(fd, b"XY", 4095)  # across a node boundary
    r["cross"] = os.pread(fd, 4, 4094).hex()
    os.ftruncate(fd, 10_000)
    r["size_after_truncate"] = os.fstat(fd).st_size
    os.ftruncate(fd, 20_000)
    r["zero_after_extend"] = os.pread(fd, 10, 15_000) == bytes(10)
    os.fsync(fd)
    os.close(fd)
    with open(p("append.log"), "ab") as f:
        for i in range(100):
            f.write(b"line %d\n" % i)
    # rename: plain, over an existing file, and of a folder; unlink; rmdir
    with open(p("a"), "w") as f:
        f.write("A")
    with open(p("b"), "w") as f:
        f.write("B")
    os.rename(p("a"), p("b"))
    with open(p("b")) as f:
        r["rename_over"] = f.read()
    os.rename(p("dir", "sub"), p("moved-sub"))
    r["rename_dir"] = sorted(os.listdir(p("moved-sub")))
    r["rmdir_not_empty"] = expect_errno(errno.ENOTEMPTY, os.rmdir, p("moved-sub"))
    os.rmdir(p("moved-sub", "deeper"))
    os.rmdir(p("moved-sub"))
    with open(p("gone"), "w") as f:
        f.write("x")
    os.unlink(p("gone"))
    r["unlinked"] = not os.path.exists(p("gone"))
    # an unlinked file stays readable through an open descriptor
    with open(p("ghost"), "w+") as f:
        f.write("boo")
        f.flush()
        os.unlink(p("ghost"))
        f.seek(0)
        r["ghost"] = f.read()
    os.symlink("dir/hello.txt", p("link"))
    r["symlink"] = os.readlink(p("link"))
    with open(p("link")) as f:
        r["via_link"] = f.read()
    os.chmod(p("dir", "hello.txt"), 0o640)
    st = os.stat(p("dir", "hello.txt"))
    r["mode"] = oct(st.st_mode & 0o7777)
    r["nlink_dir"] = os.stat(p("dir")).st_nlink
    r["isdir_unlink"] = expect_errno(errno.EISDIR, os.unlink, p("dir"))
    r["enoent"] = expect_errno(errno.ENOENT, os.stat, p("nothing"))
    r["hardlink_refused"] = expect_errno(errno.EPERM, os.link, p("b"), p("b2"))
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)
    r["listing"] = sorted(os.listdir(root))
    r["statvfs"] = os.statvfs(root).f_bsize
    print(json.dumps(r))


def persisted(root):
    r = {}
    with open(os.path.join(root, "dir", "hello.txt")) as f:
        r["hello"] = f.read()
    with open(os.path.join(root, "big.bin"), "rb") as f:
        data = f.read()
    r["big"] = [len(data), data[:4096] == (bytes(range(256)) * 16)[:4095] + b"X", data[10_000:] == bytes(10_000)]
    with open(os.path.join(root, "append.log"), "rb") as f:
        r["lines"] = len(f.read().splitlines())
    r["listing"] = sorted(os.listdir(root))
    r["mode"] = oct(os.stat(os.path.join(root, "dir", "hello.txt")).st_mode & 0o7777)
    print(json.dumps(r))


def readall(root):
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            key = "/" + os.path.relpath(path, root)
            try:
                with open(path, "rb") as f:
                    found[key] = "sha256:" + digest(f.read())
            except OSError as exc:
                found[key] = "errno:" + errno.errorcode.get(exc.errno, str(exc.errno))
    print(json.dumps(found))


def writer(root, seed):
    rng = random.Random(seed)
    out("ready")
    while True:
        k = rng.randrange(5)
        path = os.path.join(root, "f%d" % k)
        if rng.random() < 0.5 or not os.path.exists(path):
            data = rng.randbytes(rng.choice([0, 100, 5000, 70_000, 300_000]))
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            out("begin f%d %s" % (k, digest(data)))
            os.rename(tmp, path)
            dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(dfd)
            os.close(dfd)
            out("commit f%d %s" % (k, digest(data)))
        else:
            with open(path, "r+b") as f:
                data = bytearray(f.read())
                off = rng.randrange(0, len(data) + 1)
                chunk = rng.randbytes(rng.randrange(1, 4097 - off % 4096))
                end = off + len(chunk)
                if end > len(data):
                    data.extend(bytes(end - len(data)))
                data[off:end] = chunk
                out("begin f%d %s" % (k, digest(bytes(data))))
                os.pwrite(f.fileno(), chunk, off)
                os.fsync(f.fileno())
                out("commit f%d %s" % (k, digest(bytes(data))))


def sqlite_writer(db):
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, pad BLOB)")
    n = conn.execute("SELECT COALESCE(MAX(n), 0) FROM t").fetchone()[0]
    out("ready %d" % n)
    rng = random.Random(n)
    while True:
        n += 1
        out("begin %d" % n)
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t VALUES (?, ?)", (n, rng.randbytes(rng.choice([10, 3000, 20000]))))
        if n % 7 == 0:
            conn.execute("DELETE FROM t WHERE n = ?", (n - 5,))
            conn.execute("INSERT INTO t VALUES (?, ?)", (-n, b"tombstone"))
        conn.execute("COMMIT")
        out("commit %d" % n)


def sqlite_check(db):
    conn = sqlite3.connect(db)
    check = conn.execute("PRAGMA integrity_check").fetchall()
    top = conn.execute("SELECT COALESCE(MAX(n), 0) FROM t").fetchone()[0]
    rows = conn.execute("SELECT COUNT(*) FROM t").fetchone()[0]
    print(json.dumps({"integrity": [row[0] for row in check], "max": top, "rows": rows}))


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    try:
        {"posix": posix, "persisted": persisted, "readall": readall, "sqlite-check": sqlite_check}[command](
            *args
        ) if command not in ("writer", "sqlite-writer") else (
            writer(args[0], int(args[1])) if command == "writer" else sqlite_writer(args[0])
        )
    except OSError as exc:
        out("oserror %s %s" % (errno.errorcode.get(exc.errno, exc.errno), exc))
        sys.exit(1)
