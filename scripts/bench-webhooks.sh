#!/usr/bin/env bash
# Webhook benchmark: does sending events slow delivery, and how fast are events dispatched?
# N emails (default 20000) are queued first (`postbox api`, batches of 1,000), then
# `postbox worker` delivers them to smtp-sink on 127.0.0.1, twice per sitting each way:
#   - without webhooks: delivered/s;
#   - with one endpoint subscribed to every event (a minimal keep-alive HTTP receiver on
#     127.0.0.1 answering 204): delivered/s, and events/s reaching the receiver (2 per email:
#     email.queued, email.sent), counted from the worker's start until the last one arrives.
# Usage: scripts/bench-webhooks.sh [N=20000] [PAIRS=2]: PAIRS pairs of runs (without, with),
# alternated; the ratio of each pair and their median. This box drifts within seconds, so use
# several pairs. BENCH_POSTBOX_BIN=<binary> measures another build (an old commit's) without
# building. Needs smtp-sink (Debian's postfix; scripts/test.sh installs it). Prints figures;
# asserts none.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-20000}"
PAIRS="${2:-2}"
BIN="${BENCH_POSTBOX_BIN:-target/release/postbox}"
[ -n "${BENCH_POSTBOX_BIN:-}" ] || cargo build --locked --release --quiet
. scripts/bench-lib.sh
start_work_and_sink

# The receiver: counts POSTs; GET /count answers the count.
cat >"$WORK/receiver.py" <<'PY'
import asyncio, sys
count = 0
class P(asyncio.Protocol):
    def connection_made(self, t): self.t, self.buf = t, b""
    def data_received(self, d):
        global count
        self.buf += d
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0: return
            head = self.buf[:i].decode("latin-1")
            n = 0
            for line in head.split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length": n = int(v)
            if len(self.buf) < i + 4 + n: return
            self.buf = self.buf[i + 4 + n:]
            if head.startswith("GET"):
                body = str(count).encode()
                self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            else:
                count += 1
                self.t.write(b"HTTP/1.1 204 No Content\r\n\r\n")
async def main():
    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(sys.argv[1]))
    await srv.serve_forever()
asyncio.run(main())
PY
HOOK_PORT=$(free_port)
python3 "$WORK/receiver.py" "$HOOK_PORT" &
RECEIVER=$!
PIDS+=($RECEIVER)
cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat"; }
TOKEN="bench-token-0123456789abcdef"
received() { curl -sf "http://127.0.0.1:$HOOK_PORT/count"; }
# Waits until database $1 has $2 sent emails (one Python process polling every 0.2 s; a Python
# start per poll, through pyenv's shims, took a quarter of this box's CPU) and prints when the
# last of them was recorded sent (`updated_at`), so the poll's own delay and cost stay out of
# the figure.
wait_sent() {
    python3 - "$1" "$2" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1])
while db.execute("select count(*) from postbox_emails where status = 'sent'").fetchone()[0] < int(sys.argv[2]):
    time.sleep(0.2)
print(db.execute("select max(updated_at) from postbox_emails").fetchone()[0] / 1000)
PY
}

python3 - "$WORK/batch.json" <<'PY'
import json, sys
emails = [{"to": [f"user{i}@example.com"], "subject": f"Hello {i}", "text": "Body", "tags": ["bench"]} for i in range(1000)]
open(sys.argv[1], "w").write(json.dumps({"emails": emails}))
PY

run() { # label hooks(0|1)
    local dir="$WORK/$1" port api worker t0 t1 t2 before
    mkdir -p "$dir"
    port=$(free_port)
    {
        echo "[database]"; echo "url = \"sqlite://$dir/postbox.db\""
        echo "[api]"; echo "listen = \"127.0.0.1:$port\""
        echo "[delivery]"; echo 'transport = "smtp"'
        echo "[smtp]"; echo 'host = "127.0.0.1"'; echo "port = $SINK_PORT"; echo 'tls = "none"'
        echo "[log]"; echo 'level = "warn"'
        if [ "$2" = 1 ]; then
            echo "[[webhooks]]"; echo 'name = "bench"'; echo "url = \"http://127.0.0.1:$HOOK_PORT/hook\""
            echo 'secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"'
        fi
    } >"$dir/postbox.toml"
    POSTBOX_API__TOKEN=$TOKEN "$BIN" --config "$dir/postbox.toml" api 2>>"$dir/log" &
    api=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
    for _ in $(seq $((N / 1000))); do
        curl -sf -o /dev/null "http://127.0.0.1:$port/v1/emails/batch" -H "Authorization: Bearer $TOKEN" \
            -H 'Content-Type: application/json' --data-binary "@$WORK/batch.json"
    done
    kill "$api"; wait "$api" 2>/dev/null || true
    before=$(received)
    local rcpu0; rcpu0=$(cpu "$RECEIVER")
    t0=$(date +%s.%N)
    "$BIN" --config "$dir/postbox.toml" worker 2>>"$dir/log" &
    worker=$!
    t1=$(wait_sent "$dir/postbox.db" "$N")
    if [ "$2" = 1 ]; then
        while [ $(( $(received) - before )) -lt $((2 * N)) ]; do sleep 0.05; done
        t2=$(date +%s.%N)
    fi
    local wcpu rcpu; wcpu=$(cpu "$worker"); rcpu=$(cpu "$RECEIVER")
    kill "$worker"; wait "$worker" 2>/dev/null || true
    python3 - "$1" "$N" "$t0" "$t1" "${t2:-}" "$wcpu" "$rcpu0" "$rcpu" "$WORK/$1.rate" <<'PY'
import sys
label, n, t0, t1, t2 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
wcpu, rcpu = float(sys.argv[6]), float(sys.argv[8]) - float(sys.argv[7])
open(sys.argv[9], "w").write(f"{n / (t1 - t0)}\n")
line = f"{label:22} delivered/s {n / (t1 - t0):7.0f}   worker CPU {wcpu:5.1f} s"
if t2:
    line += f"   webhook events/s {2 * n / (float(t2) - t0):7.0f} ({2 * n} events; receiver CPU {rcpu:4.1f} s)"
print(line)
PY
}

echo "N = $N emails (queued first, then one worker process delivers), $PAIRS pairs"
for i in $(seq "$PAIRS"); do
    run "without-webhooks-$i" 0
    run "with-1-webhook-$i" 1
    echo "$(cat "$WORK/with-1-webhook-$i.rate") $(cat "$WORK/without-webhooks-$i.rate")" |
        awk '{ printf "%.4f\n", $1 / $2 }' >>"$WORK/ratios"
done
awk '{ printf "pair %d: with / without webhooks %.2f\n", NR, $1 }' "$WORK/ratios"
sort -n "$WORK/ratios" | awk '{ r[NR] = $1 } END { m = (NR % 2) ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2
    printf "median ratio, with / without webhooks: %.2f over %d pairs\n", m, NR }'
