#!/usr/bin/env bash
# Rate limit benchmark: do limits that are configured but not binding slow delivery down?
# N emails (default 20000) are queued first (`postbox api`, batches of 1,000 to 100 recipient
# domains), then `postbox worker` delivers them to smtp-sink on 127.0.0.1, alternating, twice
# each:
#   - unlimited: no rate limit;
#   - limited: the relay at 1,000,000/s and a [[domain_limits]] entry (1,000,000/s) for every
#     one of the 100 recipient domains: every email takes two slots (relay + domain), none waits.
# Prints delivered/s and the worker's CPU seconds per run; asserts nothing.
# Usage: scripts/bench-limits.sh [N=20000] [sqlite|postgres]. postgres needs TEST_PG_URL (an admin
# URL, e.g. from scripts/pg-throwaway.sh); a fresh database is made per run.
# Needs smtp-sink (Debian's postfix; scripts/test.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-20000}"
BACKEND="${2:-sqlite}"
cargo build --locked --release --quiet
. scripts/bench-lib.sh
start_work_and_sink
cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }
TOKEN="bench-token-0123456789abcdef"

python3 - "$WORK/batch.json" <<'PY'
import json, sys
emails = [{"to": [f"user{i}@d{i % 100}.example.com"], "subject": f"Hello {i}", "text": "Body"} for i in range(1000)]
open(sys.argv[1], "w").write(json.dumps({"emails": emails}))
PY

n=0
run() { # label limited(0|1)
    local dir="$WORK/$1" port api worker t0 t1 url count
    n=$((n + 1))
    mkdir -p "$dir"
    port=$(free_port)
    if [ "$BACKEND" = postgres ]; then
        local db="bench_limits_$$_$n"
        psql -q "$TEST_PG_URL" -c "CREATE DATABASE $db" >/dev/null
        url="${TEST_PG_URL%/*}/$db"
        count() { psql -tAq "$url" -c "select count(*) from postbox_emails where status='sent'"; }
    else
        url="sqlite://$dir/postbox.db"
        count() { python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(\"select count(*) from postbox_emails where status='sent'\").fetchone()[0])" "$dir/postbox.db"; }
    fi
    {
        echo "[database]"; echo "url = \"$url\""
        echo "[api]"; echo "listen = \"127.0.0.1:$port\""
        echo "[delivery]"; echo 'transport = "smtp"'
        echo "[smtp]"; echo 'host = "127.0.0.1"'; echo "port = $SINK_PORT"; echo 'tls = "none"'
        if [ "$2" = 1 ]; then
            echo "per_second = 1000000"
            for d in $(seq 0 99); do
                echo "[[domain_limits]]"; echo "domain = \"d$d.example.com\""; echo "per_second = 1000000"
            done
        fi
        echo "[log]"; echo 'level = "warn"'
    } >"$dir/postbox.toml"
    POSTBOX_API__TOKEN=$TOKEN target/release/postbox --config "$dir/postbox.toml" api 2>>"$dir/log" &
    api=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
    for _ in $(seq $((N / 1000))); do
        curl -sf -o /dev/null "http://127.0.0.1:$port/v1/emails/batch" -H "Authorization: Bearer $TOKEN" \
            -H 'Content-Type: application/json' --data-binary "@$WORK/batch.json"
    done
    kill "$api"; wait "$api" 2>/dev/null || true
    t0=$(date +%s.%N)
    target/release/postbox --config "$dir/postbox.toml" worker 2>>"$dir/log" &
    worker=$!
    while [ "$(count)" -lt "$N" ]; do sleep 0.05; done
    t1=$(date +%s.%N)
    local wcpu; wcpu=$(cpu "$worker")
    kill "$worker"; wait "$worker" 2>/dev/null || true
    python3 -c "import sys; print(f'{sys.argv[1]:14} delivered/s {int(sys.argv[2]) / (float(sys.argv[4]) - float(sys.argv[3])):7.0f}   worker CPU {float(sys.argv[5]):5.1f} s')" "$1" "$N" "$t0" "$t1" "$wcpu"
}

echo "N = $N emails on $BACKEND (queued first, then one worker process delivers)"
run "unlimited-1" 0
run "limited-1" 1
run "unlimited-2" 0
run "limited-2" 1
