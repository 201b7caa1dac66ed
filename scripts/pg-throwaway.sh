#!/usr/bin/env bash
# Starts a throwaway PostgreSQL (Debian's server binaries: initdb + pg_ctl) in a new temp dir,
# listening only on 127.0.0.1 at a random free port, and prints two lines:
#   TEST_PG_URL=postgres://postgres@127.0.0.1:<port>/postgres
#   PG_THROWAWAY_DIR=<dir>
# Stop it with: scripts/pg-throwaway.sh stop <dir>
# Take it down and bring it back (same port and data, for outage tests):
#   scripts/pg-throwaway.sh down <dir>; scripts/pg-throwaway.sh up <dir>
# Extra server settings can be passed in PG_THROWAWAY_OPTS (e.g. "-c fsync=off").
set -euo pipefail
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$pgbin" ] || { echo "PostgreSQL server binaries not found: apt-get install postgresql" >&2; exit 1; }
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
if [ "${1:-}" = stop ]; then
  as_owner "$pgbin/pg_ctl" -D "$2/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$2"
  exit 0
fi
if [ "${1:-}" = down ]; then
  as_owner "$pgbin/pg_ctl" -D "$2/data" -m fast -w stop >/dev/null
  exit 0
fi
if [ "${1:-}" = up ]; then
  as_owner "$pgbin/pg_ctl" -D "$2/data" -l "$2/server.log" -w -t 30 -o "$(cat "$2/opts")" start >/dev/null \
    || { cat "$2/server.log" >&2; exit 1; }
  exit 0
fi
dir=$(mktemp -d /tmp/postbox-pg.XXXXXX)
[ "$(id -u)" = 0 ] && chown postgres "$dir"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_owner "$pgbin/initdb" -D "$dir/data" -A trust -U postgres -E UTF8 >"$dir/initdb.log" 2>&1 \
  || { cat "$dir/initdb.log" >&2; exit 1; }
opts="-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=600 ${PG_THROWAWAY_OPTS:-}"
echo "$opts" > "$dir/opts"
as_owner "$pgbin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 -o "$opts" \
  start >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
echo "TEST_PG_URL=postgres://postgres@127.0.0.1:$port/postgres"
echo "PG_THROWAWAY_DIR=$dir"
