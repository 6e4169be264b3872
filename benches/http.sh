#!/usr/bin/env bash
# benches/http.sh — throughput and latency on the release server, printed as figures: req/s and
# p50/p99 (wrk, 8 connections) for POST /api/embed with one sentence and with 32 sentences per
# request, and for POST /api/classify/sentiment with one short text; and the server's peak RSS.
# Not a test: run it on a quiet machine and compare runs made back to back.
#   benches/http.sh            DURATION=20s CONNS=8 and extra server flags in AITIER_FLAGS
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${DURATION:-20s}"
conns="${CONNS:-8}"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
models/fetch minilm sentiment >/dev/null
cargo build --release --quiet
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# shellcheck disable=SC2086
target/release/aitier --port "$port" ${AITIER_FLAGS:-} >target/bench-server.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
until curl -fsS -o /dev/null "http://127.0.0.1:$port/health/ready" 2>/dev/null; do sleep 0.1; done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "rss after warm-up: $(awk '/VmRSS/{print $2/1024 " MiB"}' /proc/$server/status)"
for case in embed:embed_1 embed:embed_32 classify/sentiment:classify_1; do
  path="/api/${case%%:*}"
  body="benches/${case##*:}.json"
  n=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(len(d.get("texts", [0])))' "$body")
  for _ in 1 2 3; do curl -fsS -o /dev/null -H 'Content-Type: application/json' --data @"$body" "http://127.0.0.1:$port$path"; done
  line=$(wrk -t1 -c"$conns" -d"$duration" --timeout 60s -s benches/post.lua "http://127.0.0.1:$port$path" -- "$body" | grep '^RESULT')
  rps=$(sed 's/.*rps=\([0-9.]*\).*/\1/' <<<"$line")
  echo "POST $path x$n, $conns connections: $line texts_per_s=$(awk -v r="$rps" -v n="$n" 'BEGIN{printf "%.0f", r*n}')"
done
echo "peak rss: $(awk '/VmHWM/{print $2/1024 " MiB"}' /proc/$server/status)"
