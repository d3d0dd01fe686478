#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need that the
# machine lacks (promtool from Debian's prometheus package, openssl for test certificates, PostgreSQL server
# binaries), then runs `cargo test`. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need_apt+=(postgresql)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "test.sh: installing ${need_apt[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "test.sh: please install: ${need_apt[*]} (sudo apt-get install ${need_apt[*]})" >&2
    exit 1
  fi
fi

exec cargo test "$@"
