#!/usr/bin/env bash
# The watcher benchmark: a real Dovecot on 127.0.0.1 (started by the benchmark, as in the tests).
#   N  messages for the latency run, one at a time, with IDLE (default 50)
#   M  messages in the backlog scanned with from_start = true (default 10000)
# Needs Debian's dovecot-imapd and openssl (scripts/test.sh installs them). Prints figures.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --locked --bench imap -- "${1:-50}" "${2:-10000}"
