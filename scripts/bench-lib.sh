# What the benchmark scripts share; sourced by them (`. scripts/bench-lib.sh`), not run.

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# A status's count in the totals of `"$bin" stats --json`, read with awk: a Python start per
# poll (pyenv's shims included) took ~20% of this box's CPU in the PostgreSQL runs.
total() { "$bin" stats --json | awk -v k="\"$1\"" '/"totals"/ { t = 1 } t && index($0, k) { gsub(/[^0-9]/, ""); n = $0 } t && /}/ { exit } END { print n + 0 }'; }

# A fresh directory $WORK (from mktemp template $1, if given), processes $PIDS killed and
# $WORK removed at exit, and Postfix's smtp-sink on 127.0.0.1:$SINK_PORT.
start_work_and_sink() {
    WORK=$(mktemp -d ${1:+"$1"})
    PIDS=()
    trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
    SINK_PORT=$(free_port)
    local sink; sink=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
    "$sink" -u nobody -c "127.0.0.1:$SINK_PORT" 1000 >/dev/null 2>&1 &
    PIDS+=($!)
}
