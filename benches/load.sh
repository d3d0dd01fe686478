#!/usr/bin/env bash
# Load harness (issue 6): nginx vs tollgate on one machine, one command.
#
#   benches/load.sh [DURATION_SECONDS]
#
# Starts a minimal origin (nginx, `return 200`), nginx as a plain reverse proxy (one
# worker, upstream keep-alive), and tollgate on a free route, a credits route on
# SQLite, a metered (per-token) chat route on SQLite and a credits route on PostgreSQL. Every proxy is pinned to core 0; the
# origin and the load generator (wrk) to core 1. Measures saturated requests/s
# (64 connections) and unloaded latency (1 connection), direct and through each
# proxy, in one run, then RSS idle and while streaming a 1 GB body. Prints a table
# with ratios to nginx, and RSS while a 100 MB event stream passes a metered route. Installs nginx, wrk and PostgreSQL from Debian if missing.
# Talks only to 127.0.0.1; every process it starts is stopped by PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "benches/load.sh must run as root: it installs nginx, wrk and PostgreSQL with apt-get when" >&2
  echo "missing, and runs a throwaway PostgreSQL cluster as the postgres user. Use a disposable VM or container." >&2
  exit 2
fi
DUR=${1:-10}
export PG_SYNC_COMMIT=${PG_SYNC_COMMIT:-on}
LAT_DUR=${LAT_DUR:-5}
CONNS=64
PROXY_CORE=0
LOAD_CORE=1
WORK=$(mktemp -d /tmp/tollgate-load.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  if [ -n "${PGDATA_DIR:-}" ]; then runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m immediate stop >/dev/null 2>&1 || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

need=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
PGBIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | head -1)" 2>/dev/null || true)
[ -n "$PGBIN" ] && [ -x "$PGBIN/initdb" ] || need+=(postgresql)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  PGBIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | head -1)")
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release --quiet
TG=target/release/tollgate

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

ORIGIN=$(free_port); NGX=$(free_port); TG_PORT=$(free_port); TG_ADMIN=$(free_port); TGP_PORT=$(free_port); TGP_ADMIN=$(free_port); PG_PORT=$(free_port)

# --- origin: nginx answering 200 with a small body, plus a 1 GB file for streaming
mkdir -p "$WORK/www" "$WORK/tmp"
truncate -s 1G "$WORK/www/big"
# A 100 MB OpenAI-style chat stream (content chunks, the usage chunk, [DONE]).
mkdir -p "$WORK/www/v1/stream"
python3 - "$WORK/www/v1/stream/chat" <<'PY'
import sys
chunk = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"token "},"finish_reason":null}],"usage":null}\n\n'
with open(sys.argv[1], "wb") as f:
    f.write(chunk * (100 * 1024 * 1024 // len(chunk)))
    f.write(b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":600000,"total_tokens":600012}}\n\ndata: [DONE]\n\n')
PY
CHAT_JSON='{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":1,"total_tokens":13}}'
cat > "$WORK/origin.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/origin.pid; error_log $WORK/origin.err warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $WORK/tmp; proxy_temp_path $WORK/tmp; fastcgi_temp_path $WORK/tmp; uwsgi_temp_path $WORK/tmp; scgi_temp_path $WORK/tmp;
  server { listen 127.0.0.1:$ORIGIN; location /big { root $WORK/www; }
    location = /v1/chat/completions { default_type application/json; return 200 '$CHAT_JSON'; }
    location /v1/stream/ { root $WORK/www; default_type text/event-stream; error_page 405 =200 \$uri; }
    location / { return 200 "ok\n"; } } }
CONF
taskset -c $LOAD_CORE "$NGINX" -c "$WORK/origin.conf" & PIDS+=($!)

# --- nginx as a plain reverse proxy: one worker, upstream keep-alive
cat > "$WORK/proxy.conf" <<CONF
worker_processes 1; daemon off; pid $WORK/proxy.pid; error_log $WORK/proxy.err warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $WORK/tmp; proxy_temp_path $WORK/tmp; fastcgi_temp_path $WORK/tmp; uwsgi_temp_path $WORK/tmp; scgi_temp_path $WORK/tmp;
  upstream origin { server 127.0.0.1:$ORIGIN; keepalive 128; }
  server { listen 127.0.0.1:$NGX;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; } } }
CONF
taskset -c $PROXY_CORE "$NGINX" -c "$WORK/proxy.conf" & PIDS+=($!)

# --- PostgreSQL (throwaway cluster, run as the postgres user)
id postgres >/dev/null 2>&1 || useradd --system postgres
PGDATA_DIR="$WORK/pg"; mkdir -p "$PGDATA_DIR"; chown postgres "$WORK" "$PGDATA_DIR"
# nginx's workers (not root) must still reach the origin's files under $WORK.
chmod 711 "$WORK"
runuser -u postgres -- "$PGBIN/initdb" -D "$PGDATA_DIR" -A trust -U postgres >/dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$WORK/pg.log" -w \
  -o "-p $PG_PORT -k $PGDATA_DIR -c listen_addresses=127.0.0.1 -c max_connections=200 -c synchronous_commit=${PG_SYNC_COMMIT:-on}" start >/dev/null
taskset -pc ${PG_CORE:-$LOAD_CORE} $(head -1 "$PGDATA_DIR/postmaster.pid") >/dev/null 2>&1 || true

tg_config() { # port admin backend
  cat <<CONF
[server]
listen = "127.0.0.1:$1"
worker_threads = 1
[admin]
listen = "127.0.0.1:$2"
token = "load-harness-admin-token"
[ledger]
backend = "$3"
path = "$WORK/ledger.db"
url = "postgres://postgres@127.0.0.1:$PG_PORT/postgres"
pool_size = 32
[log]
filter = "warn"
[[upstream]]
name = "origin"
url = "http://127.0.0.1:$ORIGIN"
pool_max_idle = 256
[[route]]
name = "paid"
upstream = "origin"
path = "/paid/*"
price = "0.000001"
accept = ["credits"]
[[route]]
name = "chat"
upstream = "origin"
path = "/v1/chat/completions"
methods = ["POST"]
accept = ["credits"]
meter = "openai-chat"
[[route]]
name = "stream"
upstream = "origin"
path = "/v1/stream/chat"
methods = ["POST"]
accept = ["credits"]
meter = "openai-chat"
max_price = "1000"
[[model]]
name = "*"
input = "0.15"
output = "0.60"
max_output_tokens = 1024
[[route]]
name = "free"
upstream = "origin"
path = "/*"
free = true
CONF
}
tg_config $TG_PORT $TG_ADMIN sqlite > "$WORK/tg.toml"
tg_config $TGP_PORT $TGP_ADMIN postgres > "$WORK/tgp.toml"
# Paying clients: KEYS API keys (default 64, one per connection), used round-robin by a
# wrk script, as many customers would; KEYS=1 measures one hot key instead.
export KEYS=${KEYS:-64}
make_keys() { # config [method body] → wrk lua script
  local lua="$WORK/keys-$(basename "$1" .toml)${2:+-post}.lua"
  echo "local keys = {" > "$lua"
  for _ in $(seq 1 "$KEYS"); do
    $TG keys create --balance 1000000 --json --config "$1" | python3 -c 'import json,sys; print("  \"Bearer " + json.load(sys.stdin)["key"] + "\",")' >> "$lua"
  done
  echo "}" >> "$lua"
  if [ -n "${2:-}" ]; then
    printf 'wrk.method = "%s"\nwrk.body = [[%s]]\nwrk.headers["Content-Type"] = "application/json"\n' "$2" "$3" >> "$lua"
  fi
  cat >> "$lua" <<'LUA'
local i = 0
request = function()
  i = i % #keys + 1
  return wrk.format(nil, nil, { ["Authorization"] = keys[i] })
end
LUA
  echo "$lua"
}
KEY_LUA=$(make_keys "$WORK/tg.toml")
# A typical small chat request: two messages, max_tokens 256.
CHAT_BODY='{"model":"gpt-4o-mini","max_tokens":256,"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"What is the capital of France?"}]}'
CHAT_LUA=$(make_keys "$WORK/tg.toml" POST "$CHAT_BODY")
STREAM_KEY=$($TG keys create --balance 1000000 --json --config "$WORK/tg.toml" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
PKEY_LUA=$(make_keys "$WORK/tgp.toml")
taskset -c $PROXY_CORE $TG run --config "$WORK/tg.toml" 2>"$WORK/tg.err" & TG_PID=$!; PIDS+=($TG_PID)
wait_port $ORIGIN; wait_port $NGX; wait_port $TG_PORT
sleep 0.5
IDLE_RSS=$(awk '/VmRSS/ {print $2}' /proc/$TG_PID/status)

# wrk output → "rps p50_us p99_us"
run_wrk() { # conns duration url [lua script]
  local out
  if [ -n "${4:-}" ]; then out=$(taskset -c $LOAD_CORE wrk -t1 -c"$1" -d"$2"s --latency -s "$4" "$3"); else out=$(taskset -c $LOAD_CORE wrk -t1 -c"$1" -d"$2"s --latency "$3"); fi
  python3 - "$out" <<'PY'
import re, sys
out = sys.argv[1]
if "50%" not in out:
    sys.exit("wrk gave no latency distribution:\n" + out)
def us(v):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", v)
    if not m:
        sys.exit(f"unexpected latency {v!r} in wrk output:\n{out}")
    return float(m.group(1)) * {"us": 1, "ms": 1000, "s": 1e6, "m": 6e7}[m.group(2)]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
p50 = us(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)); p99 = us(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
if non2xx: print(f"warning: {non2xx.group(1)} non-2xx responses", file=sys.stderr)
print(f"{rps:.0f} {p50:.0f} {p99:.0f}")
PY
}

# "busy idle" jiffies of one core, from /proc/stat (idle = idle + iowait).
core_ticks() { awk -v c="cpu$1" '$1 == c { b = 0; for (i = 2; i <= NF; i++) b += $i; print b - $5 - $6, $5 + $6 }' /proc/stat; }
# Share of a core that was busy between two core_ticks samples, in percent.
busy_pct() { # "busy0 idle0" "busy1 idle1"
  python3 -c 'import sys; b0, i0 = map(int, sys.argv[1].split()); b1, i1 = map(int, sys.argv[2].split()); t = (b1 - b0) + (i1 - i0); print(round(100 * (b1 - b0) / t) if t else 0)' "$1" "$2"
}

# CPU clock ticks (user + system) used so far by the PostgreSQL cluster (postmaster
# PG_PM and its children), once PG_PM is set.
pg_ticks() {
  [ -n "${PG_PM:-}" ] || { echo 0; return; }
  cat /proc/"$PG_PM"/stat $(pgrep -P "$PG_PM" | sed 's#.*#/proc/&/stat#') 2>/dev/null | awk '{ t += $14 + $15 } END { print t + 0 }'
}
CLK_TCK=$(getconf CLK_TCK)

declare -A RPS P50 P99 BUSY0 BUSY1 PG_US
measure() { # name url [lua script]
  local c0 c1 p0
  c0=$(core_ticks $PROXY_CORE); c1=$(core_ticks $LOAD_CORE); p0=$(pg_ticks)
  read -r r _ _ < <(run_wrk $CONNS "$DUR" "$2" "${3:-}")
  BUSY0[$1]=$(busy_pct "$c0" "$(core_ticks $PROXY_CORE)"); BUSY1[$1]=$(busy_pct "$c1" "$(core_ticks $LOAD_CORE)")
  PG_US[$1]=$(( ($(pg_ticks) - p0) * 1000000 / CLK_TCK / (r * DUR > 0 ? r * DUR : 1) ))
  read -r _ a b < <(run_wrk 1 "$LAT_DUR" "$2" "${3:-}")
  RPS[$1]=$r; P50[$1]=$a; P99[$1]=$b
  echo "  $1: $r req/s (proxy core ${BUSY0[$1]}% busy, load core ${BUSY1[$1]}%), p50 ${a}µs, p99 ${b}µs" >&2
}
echo "measuring (${DUR}s saturated, ${LAT_DUR}s unloaded each)…" >&2
measure direct "http://127.0.0.1:$ORIGIN/x"
measure nginx "http://127.0.0.1:$NGX/x"
measure tollgate_free "http://127.0.0.1:$TG_PORT/x"
measure tollgate_credits_sqlite "http://127.0.0.1:$TG_PORT/paid/x" "$KEY_LUA"
measure tollgate_metered_sqlite "http://127.0.0.1:$TG_PORT/v1/chat/completions" "$CHAT_LUA"

# Streaming RSS: 1 GB through tollgate, sampling RSS.
MAXRSS=$IDLE_RSS
taskset -c $LOAD_CORE curl -s -o /dev/null -w '%{http_code} %{size_download}' "http://127.0.0.1:$TG_PORT/big" > "$WORK/big.status" & CURL=$!
while kill -0 $CURL 2>/dev/null; do
  r=$(awk '/VmRSS/ {print $2}' /proc/$TG_PID/status); [ "$r" -gt "$MAXRSS" ] && MAXRSS=$r; sleep 0.05
done
read -r BIG_STATUS BIG_BYTES < "$WORK/big.status" || true  # no newline at its end
[ "$BIG_STATUS" = 200 ] && [ "$BIG_BYTES" -ge 1073741824 ] || echo "the 1 GB download was answered $BIG_STATUS after $BIG_BYTES bytes" >&2
# Metered streaming RSS: a 100 MB event stream through the usage meter.
SSE_BASE=$(awk '/VmRSS/ {print $2}' /proc/$TG_PID/status); SSE_MAX=$SSE_BASE
taskset -c $LOAD_CORE curl -s -o "$WORK/sse.out" -w '%{http_code}' -H "Authorization: Bearer $STREAM_KEY" -H 'Content-Type: application/json' \
  -d '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Count."}]}' \
  "http://127.0.0.1:$TG_PORT/v1/stream/chat" > "$WORK/sse.status" & CURL=$!
while kill -0 $CURL 2>/dev/null; do
  r=$(awk '/VmRSS/ {print $2}' /proc/$TG_PID/status); [ "$r" -gt "$SSE_MAX" ] && SSE_MAX=$r; sleep 0.05
done
SSE_BYTES=$(stat -c %s "$WORK/sse.out")
if [ "$(cat "$WORK/sse.status")" != 200 ]; then
  echo "the metered stream was answered $(cat "$WORK/sse.status"): $(head -c 500 "$WORK/sse.out")" >&2
fi
export SSE_BASE SSE_MAX SSE_BYTES
kill $TG_PID; wait $TG_PID 2>/dev/null || true

taskset -c $PROXY_CORE $TG run --config "$WORK/tgp.toml" 2>"$WORK/tgp.err" & TGP_PID=$!; PIDS+=($TGP_PID)
wait_port $TGP_PORT; sleep 0.5
PG_PM=$(head -1 "$PGDATA_DIR/postmaster.pid")
measure tollgate_credits_postgres "http://127.0.0.1:$TGP_PORT/paid/x" "$PKEY_LUA"

export PG_CPU_US=${PG_US[tollgate_credits_postgres]}
row() { echo "${RPS[$1]} ${P50[$1]} ${P99[$1]} ${BUSY0[$1]} ${BUSY1[$1]}"; }
python3 - "$IDLE_RSS" "$MAXRSS" "$(row direct)" "$(row nginx)" "$(row tollgate_free)" \
  "$(row tollgate_credits_sqlite)" "$(row tollgate_metered_sqlite)" "$(row tollgate_credits_postgres)" <<'PY'
import sys, subprocess, datetime, platform
idle, maxrss = int(sys.argv[1]), int(sys.argv[2])
rows = ["direct (no proxy)", "nginx (plain proxy)", "tollgate free route", "tollgate credits (SQLite)", "tollgate metered chat (SQLite)", "tollgate credits (PostgreSQL)"]
vals = [list(map(float, a.split())) for a in sys.argv[3:9]]
ng = vals[1][0]; d50, d99 = vals[0][1], vals[0][2]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.machine())
ver = subprocess.run(["target/release/tollgate", "--version"], capture_output=True, text=True).stdout.strip()
ngv = subprocess.run(["sh", "-c", "nginx -v 2>&1 || /usr/sbin/nginx -v 2>&1"], capture_output=True, text=True).stdout.strip()
print(f"\n{datetime.date.today()} · {cpu} · {ver} · {ngv} · proxies pinned to 1 core, wrk + origin on the other\n")
print("| path | req/s (64 conns) | × nginx | proxy core busy | load core busy | proxy core µs/req | p50 µs (1 conn) | p99 µs | added p50 µs | added p99 µs |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for name, (r, p50, p99, b0, b1) in zip(rows, vals):
    direct = name.startswith("direct")
    ratio = "—" if direct else f"{r/ng:.2f}"
    add50 = "—" if direct else f"{p50-d50:.0f}"
    add99 = "—" if direct else f"{p99-d99:.0f}"
    cost = "—" if direct else f"{b0 / 100 * 1e6 / r:.1f}"
    print(f"| {name} | {r:.0f} | {ratio} | {b0:.0f}% | {b1:.0f}% | {cost} | {p50:.0f} | {p99:.0f} | {add50} | {add99} |")
import os
print("\nproxy core µs/req: the proxy core's busy time per request at saturation (its cost per request; a")
print("proxy core below 100% busy means the bound was elsewhere, e.g. the load core running wrk, the origin and PostgreSQL).")
print(f"\nPaying clients use {os.environ.get('KEYS', '64')} API keys round-robin; PostgreSQL 15 on the same machine, synchronous_commit={os.environ.get('PG_SYNC_COMMIT', 'on')}")
print(f"PostgreSQL's own CPU per paid request (all its processes, saturated run): {os.environ['PG_CPU_US']} µs")
print(f"tollgate RSS: idle {idle/1024:.1f} MB; max while streaming 1 GB {maxrss/1024:.1f} MB")
print(f"metered chat vs fixed-price credits (same run): {vals[4][0] / vals[3][0]:.2f}x")
e = os.environ
print(f"metered event stream: {int(e['SSE_BYTES']) / 1e6:.0f} MB delivered; RSS {int(e['SSE_BASE'])/1024:.1f} MB before, max {int(e['SSE_MAX'])/1024:.1f} MB during")
PY
