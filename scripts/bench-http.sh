#!/usr/bin/env bash
# HTTP API benchmark: wrk (keep-alive) against `postbox api` on 127.0.0.1 with a fresh SQLite DB.
#   1. POST /v1/emails, one email per request, 64 connections
#   2. the same, each connection pausing 7 ms between requests (about 7,000/s: latency below
#      saturation; wrk has no fixed-rate mode)
#   3. POST /v1/emails/batch, 1,000 emails per request, 8 connections
# Afterwards the rows in the database are counted, so "accepted" means committed.
# Usage: scripts/bench-http.sh [SECONDS=10]. Installs Debian's wrk if missing. Prints figures.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-10}"
if ! command -v wrk >/dev/null; then
    echo "installing wrk (Debian package)..." >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq wrk >/dev/null
fi
cargo build --locked --release --quiet
WORK="$(mktemp -d)"
PID=""
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
TOKEN="bench-token-0123456789abcdef"
export POSTBOX_DATABASE__URL="sqlite://$WORK/postbox.db" POSTBOX_API__LISTEN="127.0.0.1:$PORT" \
       POSTBOX_API__TOKEN="$TOKEN" POSTBOX_LOG__LEVEL="warn,postbox::store=debug"
target/release/postbox api 2>"$WORK/postbox.log" &
PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break; sleep 0.1; done

count() { python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from postbox_emails').fetchone()[0])" "$WORK/postbox.db"; }

cat >"$WORK/one.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $TOKEN"
wrk.body = '{"to":["Ada <ada@example.com>"],"template":"welcome","variables":{"name":"Ada","product":"Postbox"},"tags":["bench"]}'
LUA
cp "$WORK/one.lua" "$WORK/paced.lua"
echo 'function delay() return 7 end' >>"$WORK/paced.lua"
python3 - "$WORK/batch.lua" "$TOKEN" <<'PY'
import json, sys
emails = [{"to": [f"user{i}@example.com"], "subject": f"Hello {i}", "text": "Body", "tags": ["bench"]} for i in range(1000)]
body = json.dumps({"emails": emails})
open(sys.argv[1], "w").write(
    'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
    f'wrk.headers["Authorization"] = "Bearer {sys.argv[2]}"\nwrk.body = [[{body}]]\n')
PY

run() { # name connections script
    local before after out
    before=$(count)
    out=$(wrk -t2 -c"$2" -d"${SECS}s" --latency -s "$WORK/$3" "http://127.0.0.1:$PORT$4")
    after=$(count)
    echo "== $1 (wrk -t2 -c$2 -d${SECS}s)"
    echo "$out" | grep -E "Latency|50%|90%|99%|Requests/sec|requests in|Non-2xx|Socket errors" | sed 's/^/   /'
    echo "   committed rows: $((after - before)) -> $(( (after - before) / SECS )) emails/s"
}
run "POST /v1/emails, one email per request" 64 one.lua /v1/emails
run "POST /v1/emails, paced (7 ms pause per connection)" 64 paced.lua /v1/emails
run "POST /v1/emails/batch, 1000 emails per request" 8 batch.lua /v1/emails/batch
echo "peak RSS of postbox api: $(grep VmHWM /proc/$PID/status | awk '{print $2/1024 " MB"}')"
kill -INT "$PID"; wait "$PID" 2>/dev/null || true; PID=""
echo "group commits slower than 20 ms (write stalls; each delays every request in it): $(grep -c 'slow group commit' "$WORK/postbox.log" || true)"
