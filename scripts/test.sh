#!/usr/bin/env bash
# Runs every test postbox has, installing what they need first.
#   - Debian's postfix (for smtp-sink, used by scripts/bench.sh and as a reference SMTP peer,
#     and a real Postfix, started with its own config in a temp dir, that writes a bounce);
#   - Debian's dovecot-imapd (the watcher tests start their own Dovecot on random loopback ports)
#     and openssl (their throwaway CA and certificate);
#   - Debian's chromium and chromium-driver (the dashboard test drives a real headless Chromium);
#   - Debian's postgresql (server binaries only: a throwaway cluster is made with initdb and
#     pg_ctl in a temp dir on a random 127.0.0.1 port, and removed at exit).
#   - a Python venv (target/test-venv) with the Standard Webhooks reference library from PyPI,
#     which the webhook tests' receiver verifies every signature with, and dkimpy (+ PyNaCl for
#     Ed25519), the independent verifier of postbox's DKIM signatures.
# Two passes: every test on SQLite (the cluster tests always use PostgreSQL), then the delivery,
# API, watcher, webhook and relay tests (modules of the one integration binary, tests/it/) again with
# TEST_DB_BACKEND=postgres.
# The delivery tests themselves run a real SMTP server inside the test harness on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -x /usr/sbin/smtp-sink ] || command -v smtp-sink >/dev/null 2>&1 || missing+=(postfix)
[ -x /usr/sbin/dovecot ] || missing+=(dovecot-imapd)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing test dependencies: ${missing[*]}"
  echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Tests are fast on a throwaway server without fsync (kill -9 tests kill postbox, never
# PostgreSQL).
pg=$(PG_THROWAWAY_OPTS="-c fsync=off -c synchronous_commit=off -c full_page_writes=off" scripts/pg-throwaway.sh)
export "$(echo "$pg" | sed -n 1p)"
pg_dir=$(echo "$pg" | sed -n 2p | cut -d= -f2)
trap 'scripts/pg-throwaway.sh stop "$pg_dir"' EXIT

# The webhook tests verify signatures with the Standard Webhooks reference library (PyPI); the
# DKIM test verifies postbox's signatures with dkimpy.
venv=target/test-venv
if ! "$venv/bin/python" -c 'import standardwebhooks, dkim, nacl' >/dev/null 2>&1; then
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv" >/dev/null 2>&1 || {
    # Debian splits venv out of python3.
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    python3 -m venv "$venv"
  }
  "$venv/bin/pip" install -q 'standardwebhooks==1.1.0' 'dkimpy==1.1.8' 'PyNaCl==1.5.0'
fi
export TEST_PYTHON="$PWD/$venv/bin/python"

cargo test --locked "$@"
echo "== again on PostgreSQL: delivery, API, watcher, webhook and relay tests =="
TEST_DB_BACKEND=postgres cargo test --locked --test it "$@" -- delivery:: api:: watcher:: webhooks:: relays::
