#!/usr/bin/env bash
# Runs every test postbox has, installing what they need first.
#   - Debian's postfix (for smtp-sink, used by scripts/bench.sh and as a reference SMTP peer);
#   - Debian's dovecot-imapd (the watcher tests start their own Dovecot on random loopback ports)
#     and openssl (their throwaway CA and certificate);
#   - Debian's chromium and chromium-driver (the dashboard test drives a real headless Chromium).
# The delivery tests themselves run a real SMTP server inside the test harness on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -x /usr/sbin/smtp-sink ] || command -v smtp-sink >/dev/null 2>&1 || missing+=(postfix)
[ -x /usr/sbin/dovecot ] || missing+=(dovecot-imapd)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing test dependencies: ${missing[*]}"
  echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

cargo test --locked "$@"
