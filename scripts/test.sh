#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests need that the
# machine lacks (promtool from Debian's prometheus package, openssl for test certificates, PostgreSQL server
# binaries, the official x402 clients under target/interop/), then runs `cargo test`.
# Extra arguments go to `cargo test`. TOLLGATE_SKIP_INTEROP=1 skips installing the x402
# clients (offline machines); their tests then say they were skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need_apt+=(postgresql)
fi
if [ "${TOLLGATE_SKIP_INTEROP:-}" != 1 ]; then
  # The official x402 npm clients need Node.js and npm (Debian's will do).
  command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
  command -v npm >/dev/null 2>&1 || need_apt+=(npm)
  # The Python client and the origin frameworks go into a venv.
  python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
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

# The official x402 clients that tests/it/x402.rs runs (and the Flask and Starlette
# origins tests/it/bypass.rs attacks), pinned in tests/interop/: npm
# (x402-fetch 1.x, @x402/fetch 2.x) and PyPI (x402 2.x). Installed under
# target/interop/ and reinstalled only when their pins change; a failed install fails
# here rather than letting the tests skip.
interop="$PWD/target/interop"
install_interop() {
  local node="$interop/node" venv="$interop/venv"
  if ! cmp -s tests/interop/package-lock.json "$node/.installed"; then
    echo "test.sh: installing the npm x402 clients into $node" >&2
    rm -rf "$node" && mkdir -p "$node"
    cp -R tests/interop/package.json tests/interop/package-lock.json tests/interop/stub "$node/"
    (cd "$node" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
    cp tests/interop/package-lock.json "$node/.installed"
  fi
  if ! cmp -s tests/interop/requirements.txt "$venv/.installed"; then
    echo "test.sh: installing the Python interop clients (x402, openai, anthropic) and origins into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r tests/interop/requirements.txt
    cp tests/interop/requirements.txt "$venv/.installed"
  fi
}
if [ "${TOLLGATE_SKIP_INTEROP:-}" != 1 ]; then
  for tool in node npm python3; do
    command -v "$tool" >/dev/null 2>&1 || { echo "test.sh: $tool is needed for the x402 interop tests (or set TOLLGATE_SKIP_INTEROP=1)" >&2; exit 1; }
  done
  install_interop
  export TOLLGATE_INTEROP_DIR="$interop" TOLLGATE_INTEROP_REQUIRED=1
fi

exec cargo test "$@"
