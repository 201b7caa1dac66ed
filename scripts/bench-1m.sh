#!/usr/bin/env bash
# A full queue: the same figures on an empty queue and with N emails queued (default
# 1,000,000), on SQLite, all on 127.0.0.1:
#   - GET /v1/stats and GET /metrics latency (wrk, 2 connections, 5 s);
#   - single POST /v1/emails (wrk, 16 connections, 5 s);
#   - delivery: a `postbox worker` sending to smtp-sink for 10 s (delivered/s).
# The queue is filled with POST /v1/emails/batch (1,000 emails a request) while no worker runs.
# Usage: scripts/bench-1m.sh [N]. Needs smtp-sink (scripts/test.sh installs postfix); installs
# Debian's wrk if missing. Prints figures; asserts nothing. Needs ~2 GB of disk for 1M.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
if ! command -v wrk >/dev/null; then
  echo "installing wrk (Debian package)..." >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq wrk >/dev/null
fi
cargo build --release --locked --quiet
bin=$PWD/target/release/postbox
. scripts/bench-lib.sh
work=$(mktemp -d /tmp/postbox-bench1m.XXXXXX)
sink_port=$(free_port)
api_port=$(free_port)
sink=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
"$sink" -u nobody 127.0.0.1:"$sink_port" 1000 & sink_pid=$!
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null
  kill "$sink_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
token="bench-token-0123456789abcdef"
export POSTBOX_API__LISTEN="127.0.0.1:$api_port" \
  POSTBOX_API__TOKEN="$token" POSTBOX_LOG__LEVEL=warn POSTBOX_QUEUE__MAX_DEPTH=0 \
  POSTBOX_DELIVERY__TRANSPORT=smtp POSTBOX_SMTP__HOST=127.0.0.1 POSTBOX_SMTP__PORT=$sink_port \
  POSTBOX_SMTP__TLS=none
cat > "$work/one.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $token"
wrk.body = '{"to":["ada@example.com"],"subject":"Hello","text":"Body","tags":["bench"]}'
LUA
cat > "$work/get.lua" <<LUA
wrk.headers["Authorization"] = "Bearer $token"
LUA

api_up() {
  "$bin" api 2>>"$work/api.log" & pid=$!
  for _ in $(seq 200); do curl -sf -o /dev/null "http://127.0.0.1:$api_port/healthz" && return; sleep 0.05; done
  echo "postbox api did not start" >&2; exit 1
}
api_down() { kill -INT "$pid"; wait "$pid" 2>/dev/null || true; pid=""; }
queued() { total queued; }
sent() { total sent; }

measure() { # label
  local out
  for path in /v1/stats /metrics; do
    out=$(wrk -t1 -c2 -d5s --latency -s "$work/get.lua" "http://127.0.0.1:$api_port$path")
    echo "$1: GET $path  p50 $(echo "$out" | awk '$1=="50%"{print $2}')  p99 $(echo "$out" | awk '$1=="99%"{print $2}')  $(echo "$out" | awk '/Requests\/sec/{print $2}') req/s"
  done
  out=$(wrk -t2 -c16 -d5s -s "$work/one.lua" "http://127.0.0.1:$api_port/v1/emails")
  echo "$1: single POST /v1/emails  $(echo "$out" | awk '/Requests\/sec/{print $2}') req/s"
}

fill() { # total
  python3 - "$1" "$api_port" "$token" <<'PY'
import http.client, json, sys, time
n, port, token = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
h = {"Content-Type": "application/json", "Authorization": "Bearer " + token}
c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
t0, done = time.time(), 0
while done < n:
    k = min(1000, n - done)
    body = json.dumps({"emails": [{"to": [f"u{done + i}@example.com"], "subject": "s", "text": "b"} for i in range(k)]})
    c.request("POST", "/v1/emails/batch", body=body, headers=h)
    r = c.getresponse(); r.read()
    if r.status != 202:
        sys.exit(f"batch -> {r.status}")
    done += k
print(f"filled {n} in {time.time() - t0:.1f} s ({n / (time.time() - t0):,.0f} emails/s)")
PY
}

deliver() { # label: a worker for 10 s
  local s0 s1 wpid
  s0=$(sent)
  "$bin" worker 2>>"$work/worker.log" & wpid=$!
  sleep 10
  s1=$(sent)
  kill -INT "$wpid"; wait "$wpid" 2>/dev/null || true
  echo "$1: delivered $((s1 - s0)) in 10 s = $(( (s1 - s0) / 10 )) delivered/s (worker start included)"
}

echo "postbox $(git rev-parse --short HEAD), SQLite, $(nproc) cores, N = $N"
# The small-queue delivery figure, on a database of its own: 200,000 queued (more than 10 s
# of work).
export POSTBOX_DATABASE__URL="sqlite://$work/small.db"
api_up; fill 200000 >/dev/null; api_down
deliver "200k queued"
export POSTBOX_DATABASE__URL="sqlite://$work/p.db"
api_up
measure "empty queue"
fill "$N"
echo "queued now: $(queued)"
measure "$N queued"
api_down
deliver "$N queued"
ls -la "$work"/p.db* | awk '{s+=$5} END {print "database files: " s/1e6 " MB"}'
