#!/usr/bin/env bash
# benches/load.sh — mixed load (benches/load.rs: embed, classify, chat, search, ingest) from 64
# clients for 60 s, twice: an open server, then one with API keys and a rate limit. Prints counts by
# status, p50/p99 per route and RSS. CLIENTS, SECS, BIN (default target/release/aitier) and LOAD_BIN
# override.
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${CLIENTS:-64}
secs=${SECS:-60}
bin=${BIN:-target/release/aitier}
# The client (LOAD_BIN to reuse one already built).
load=${LOAD_BIN:-$(cargo bench --bench load --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"]=="load"][0])')}
key=load-test-key-0123456789abcdef

run() {
  local label=$1; shift
  local port db
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  db=$(mktemp -u /tmp/aitier-load-XXXXXX.db)
  "$bin" --port "$port" --database-url "sqlite://$db" "$@" >"target/load-$label.log" 2>&1 &
  local pid=$!
  until curl -sf "http://127.0.0.1:$port/health/ready" >/dev/null; do sleep 0.5; done
  echo "== $label"
  "$load" --url "http://127.0.0.1:$port" --clients "$clients" --secs "$secs" --pid "$pid" \
    ${LOAD_KEY:+--key "$LOAD_KEY"}
  kill -TERM "$pid"; wait "$pid" || true
  rm -f "$db" "$db-wal" "$db-shm"
}

run open
LOAD_KEY=$key run keyed-limited --api-keys "$key" --rate-limit 3000
