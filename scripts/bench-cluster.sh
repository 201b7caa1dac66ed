#!/usr/bin/env bash
# Scale-out benchmark: N queued emails (default 5000) delivered to smtp-sink on 127.0.0.1 by 1, 2
# and 4 `postbox worker` processes on a throwaway PostgreSQL (default durability settings), next
# to 1 worker process on SQLite, in the same run. Prints delivered/s; asserts nothing.
# Needs Debian's postfix (smtp-sink) and postgresql (scripts/test.sh installs both).
# BENCH_POSTBOX_BIN=<binary> measures another build (an old commit's) without building;
# BENCH_WORKERS="1" (default "1 2 4") picks the PostgreSQL runs, BENCH_SQLITE=0 skips SQLite's.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000}
bin="${BENCH_POSTBOX_BIN:-target/release/postbox}"
[ -n "${BENCH_POSTBOX_BIN:-}" ] || cargo build --release --locked --quiet
. scripts/bench-lib.sh
work=$(mktemp -d /tmp/postbox-bench.XXXXXX)
sink_port=$(free_port)
sink=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
"$sink" -u nobody 127.0.0.1:"$sink_port" 1000 & sink_pid=$!
pg=$(scripts/pg-throwaway.sh)
admin=$(echo "$pg" | sed -n 1p | cut -d= -f2-)
pg_dir=$(echo "$pg" | sed -n 2p | cut -d= -f2)
cleanup() { kill "$sink_pid" 2>/dev/null || true; pkill -f "$work" 2>/dev/null || true; scripts/pg-throwaway.sh stop "$pg_dir"; rm -rf "$work"; }
trap cleanup EXIT
python3 - "$N" > "$work/emails.jsonl" <<'PY'
import json, sys
for i in range(int(sys.argv[1])):
    print(json.dumps({"to": [f"u{i}@example.com"], "subject": f"bench {i}", "text": "hello " * 40}))
PY
export POSTBOX_DELIVERY__TRANSPORT=smtp POSTBOX_SMTP__HOST=127.0.0.1 POSTBOX_SMTP__PORT=$sink_port \
  POSTBOX_SMTP__TLS=none POSTBOX_LOG__LEVEL=warn POSTBOX_QUEUE__MAX_DEPTH=0

run() { # backend workers
  local url
  runs=$((${runs:-0} + 1))
  if [ "$1" = sqlite ]; then url="sqlite://$work/bench-$runs.db"; else
    local db="bench_$runs"; psql -X -q "$admin" -c "CREATE DATABASE $db"; url="${admin%/*}/$db"; fi
  export POSTBOX_DATABASE__URL=$url
  "$bin" send --batch "$work/emails.jsonl" > /dev/null
  local t0; t0=$(date +%s.%N)
  local pids=()
  for _ in $(seq "$2"); do "$bin" worker 2>>"$work/worker.log" & pids+=($!); done
  # The end is the last send's commit time as postbox recorded it (`updated_at`, ms), so the
  # poll can be slow: a `postbox stats` every 0.1 s cost ~10% of these 2 cores.
  while :; do
    sent=$(total sent)
    [ "$sent" -ge "$N" ] && break
    sleep 0.5
  done
  local t1
  if [ "$1" = sqlite ]; then
    t1=$(python3 -c "import sqlite3, sys; print(sqlite3.connect(sys.argv[1]).execute(\"SELECT MAX(updated_at) FROM postbox_emails\").fetchone()[0] / 1000)" "$work/bench-$runs.db")
  else
    t1=$(psql -X -At "$url" -c "SELECT MAX(updated_at) / 1000.0 FROM postbox_emails")
  fi
  kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
  python3 -c "print(f'{\"$1\":<9} {$2} worker process(es): {$N} delivered in {$t1-$t0:.2f} s = {$N/($t1-$t0):,.0f} delivered/s')"
}
echo "$N emails each, smtp-sink on 127.0.0.1:$sink_port, $(nproc) cores"
[ "${BENCH_SQLITE:-1}" = 0 ] || run sqlite 1
for w in ${BENCH_WORKERS:-1 2 4}; do run postgres "$w"; done
