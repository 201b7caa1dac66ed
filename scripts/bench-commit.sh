#!/usr/bin/env bash
# The disk's commit ceiling: SQLite WAL commits per second, one at a time (one row each), with
# `synchronous = FULL` (a sync to disk per commit, postbox's default) and `NORMAL`, in the
# folder given (default: a temporary folder under $TMPDIR; put it on the disk the database
# lives on). One POST /v1/emails at a time, answered before the next, costs at least one FULL
# commit (the 202) and its delivery one more (the claim is on disk before the message is
# sent), so FULL commits/s / 2 bounds what a single client waiting on each answer can reach;
# concurrent clients and batches share commits (group commit) and are not bound by it.
# Usage: scripts/bench-commit.sh [DIR] [COMMITS=2000]. Needs python3. Prints figures.
set -euo pipefail
DIR="${1:-}"
N="${2:-2000}"
if [ -z "$DIR" ]; then
    DIR="$(mktemp -d)"
    trap 'rm -rf "$DIR"' EXIT
fi
python3 - "$DIR" "$N" <<'PY'
import os, sqlite3, sys, time
d, n = sys.argv[1], int(sys.argv[2])
for sync in ("FULL", "NORMAL", "FULL", "NORMAL"):
    p = os.path.join(d, "commit-bench.db")
    for suffix in ("", "-wal", "-shm"):
        try:
            os.remove(p + suffix)
        except FileNotFoundError:
            pass
    c = sqlite3.connect(p, isolation_level=None)
    c.execute("PRAGMA journal_mode = WAL")
    c.execute("PRAGMA synchronous = " + sync)
    c.execute("CREATE TABLE t (x INTEGER)")
    t0 = time.perf_counter()
    for i in range(n):
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT INTO t VALUES (?)", (i,))
        c.execute("COMMIT")
    dt = time.perf_counter() - t0
    c.close()
    print(f"synchronous = {sync:6}: {n / dt:8.0f} commits/s ({dt / n * 1e6:6.0f} us each)")
for suffix in ("", "-wal", "-shm"):
    try:
        os.remove(os.path.join(d, "commit-bench.db") + suffix)
    except FileNotFoundError:
        pass
PY
