#!/usr/bin/env bash
# The pipeline benchmark: N emails (default 5000) through the library to smtp-sink on 127.0.0.1.
# Needs Debian's postfix for smtp-sink (scripts/test.sh installs it). Prints figures; asserts none.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --locked --bench pipeline -- "${1:-5000}"
