#!/usr/bin/env bash
# Retention under load: what a janitor pass with a lot to delete does to the service.
# N emails (default 300,000) are queued (`postbox api`, batches of 1,000), then made old and
# final (sent, their jobs done, long ago); `postbox serve` then starts with retention on, and
# its first janitor pass has all N to delete. Meanwhile one client POSTs single emails, each
# answered before the next (delivered to smtp-sink on 127.0.0.1). Prints how long retention
# took and the POST latency during it (p50, p99, max): how long the deletes held the writer.
# Usage: scripts/bench-retention.sh [N]; BINS="old new" compares binaries on copies of one
# database, alternated twice. Needs smtp-sink (scripts/test.sh installs postfix). Prints
# figures; asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-300000}
if [ -z "${BINS:-}" ]; then
    cargo build --release --locked --quiet
    BINS=$PWD/target/release/postbox
fi
set -- $BINS
FIRST=$1
. scripts/bench-lib.sh
start_work_and_sink /tmp/postbox-retention.XXXXXX
TOKEN="bench-token-0123456789abcdef"
config() { # dir port
    cat >"$1/postbox.toml" <<TOML
[database]
url = "sqlite://$1/postbox.db"
[api]
listen = "127.0.0.1:$2"
[queue]
max_depth = 0
[retention]
emails_days = 1
finished_jobs_hours = 1
[delivery]
transport = "smtp"
[smtp]
host = "127.0.0.1"
port = $SINK_PORT
tls = "none"
[log]
level = "warn"
TOML
}
up() { # port
    for _ in $(seq 200); do curl -sf "http://127.0.0.1:$1/healthz" >/dev/null 2>&1 && return; sleep 0.05; done
    echo "postbox did not start" >&2; exit 1
}

# One database, filled once, then copied for every run.
mkdir -p "$WORK/seed"
port=$(free_port)
config "$WORK/seed" "$port"
python3 - "$WORK/batch.json" <<'PY'
import json, sys
emails = [{"to": [f"user{i}@example.com"], "subject": f"Hello {i}", "text": "Body", "tags": ["bench"]} for i in range(1000)]
open(sys.argv[1], "w").write(json.dumps({"emails": emails}))
PY
POSTBOX_API__TOKEN=$TOKEN "$FIRST" --config "$WORK/seed/postbox.toml" api 2>>"$WORK/seed/log" &
api=$!
up "$port"
for _ in $(seq $((N / 1000))); do
    curl -sf -o /dev/null "http://127.0.0.1:$port/v1/emails/batch" -H "Authorization: Bearer $TOKEN" \
        -H 'Content-Type: application/json' --data-binary "@$WORK/batch.json"
done
kill "$api"; wait "$api" 2>/dev/null || true
python3 - "$WORK/seed/postbox.db" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("UPDATE postbox_emails SET status = 'sent', updated_at = 0")
db.execute("UPDATE Jobs SET status = 'Done', done_at = 1, lock_by = NULL")
db.commit()
db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
PY
echo "N = $N old, final emails to delete; one client POSTing single emails meanwhile"

run() { # label bin
    local dir="$WORK/$1" port pid
    mkdir -p "$dir"
    cp "$WORK/seed/postbox.db" "$dir/postbox.db"
    port=$(free_port)
    config "$dir" "$port"
    POSTBOX_API__TOKEN=$TOKEN "$2" --config "$dir/postbox.toml" serve 2>>"$dir/log" &
    pid=$!
    up "$port"
    python3 - "$1" "$port" "$TOKEN" "$dir/postbox.db" <<'PY'
import http.client, json, sqlite3, sys, time
label, port, token, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
def left():
    return db.execute("SELECT (SELECT COUNT(*) FROM postbox_emails WHERE updated_at = 0)"
                      " + (SELECT COUNT(*) FROM Jobs WHERE done_at = 1)").fetchone()[0]
conn = http.client.HTTPConnection("127.0.0.1", port)
body = json.dumps({"to": ["probe@example.com"], "subject": "probe", "text": "x"})
headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
lat, t0, last = [], time.monotonic(), 0.0
while True:
    s = time.monotonic()
    conn.request("POST", "/v1/emails", body, headers)
    r = conn.getresponse(); r.read()
    assert r.status == 202, r.status
    lat.append(time.monotonic() - s)
    if time.monotonic() - last > 0.25:
        last = time.monotonic()
        if left() == 0:
            break
    if time.monotonic() - t0 > 600:
        sys.exit(f"{label}: retention not done in 10 minutes")
took = time.monotonic() - t0
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3
print(f"{label:10} retention done in {took:6.1f} s   POSTs {len(lat):6}   "
      f"latency p50 {q(0.5):6.1f} ms  p99 {q(0.99):7.1f} ms  max {lat[-1] * 1e3:7.1f} ms")
PY
    kill "$pid"; wait "$pid" 2>/dev/null || true
}
for i in 1 2; do
    for b in $BINS; do run "$(basename "$b")-$i" "$b"; done
    [ $# -gt 1 ] || break
done
