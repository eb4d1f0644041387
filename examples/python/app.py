"""A Python program run unmodified in an enclave: it shows what it can see."""

import hashlib
import json
import os
import sqlite3
import sys

db = sqlite3.connect(":memory:")
db.execute("create table t (x)")
db.executemany("insert into t values (?)", [(i,) for i in range(10)])
total = db.execute("select sum(x) from t").fetchone()[0]
print(json.dumps({
    "python": sys.version.split()[0],
    "root": sorted(os.listdir("/")),
    "sha256": hashlib.sha256(b"cove").hexdigest(),
    "sqlite_sum": total,
    "argv": sys.argv[1:],
}, sort_keys=True))
