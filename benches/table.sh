#!/usr/bin/env bash
# benches/table.sh — every row of the speed table (chat decode, 4 streams, a sampled 512-token story,
# prefill of a ~1,000-token prompt, embeddings of 1 and of 32 sentences per request, a lone request
# back to back and after a pause, RSS under mixed load) for one or two aitier builds against the
# Python peer and llama.cpp (../shared/peer) on this machine, rounds alternated A-B-peer. Prints the
# CPU, every measurement as it comes, then one table of ranges and ratios to the peer.
#
#   benches/table.sh [BIN_A [BIN_B]]      default BIN_A: target/release/aitier (built if missing)
#
# ROUNDS (2), LLAMA_THREADS ("2 1": one llama.cpp server each; a row's peer figure is the better
# one; empty: none), FLAGS (server flags for both builds, e.g. "--max-isa avx2"; with "--max-isa
# sse2", start torch off AVX too: ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41
# MKL_CBWR=COMPATIBLE in the environment reach the peer), SECS (10: each wrk run),
# LOAD_SECS (60; 0 skips the RSS rows), PEER (../shared/peer; set up once with its setup.sh),
# OUT (target/table-<time>). Peer and llama.cpp are started here and stopped at the end.
# Not a test: run it on a quiet machine. A figure measured on one CPU only is not yet a result.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-2}
secs=${SECS:-10}
load_secs=${LOAD_SECS:-60}
peer=$(cd "${PEER:-../shared/peer}" && pwd)
out=${OUT:-target/table-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
rows="$out/rows.tsv"
: >"$rows"
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
models/fetch minilm smollm2 sentiment >/dev/null
if [ -n "${1:-}" ]; then
  [ -x "$1" ] || { echo "$1: not an executable" >&2; exit 2; }
else
  [ -x target/release/aitier ] || cargo build --release --quiet --bin aitier
fi
bins=("$(realpath "${1:-target/release/aitier}")")
if [ -n "${2:-}" ]; then
  [ -x "$2" ] || { echo "$2: not an executable" >&2; exit 2; }
  bins+=("$(realpath "$2")")
fi
client() { # the benchmark client named $1, built once
  cargo bench --quiet --bench "$1" --no-run --message-format=json 2>/dev/null | python3 -c \
    'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin)
      if m.get("executable") and m["target"]["name"] == sys.argv[1]][0])' "$1"
}
chat=$(client chat)
lone=$(client lone)
load=$(client load)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ready() { # url: waits up to 2 minutes for it to answer
  local i
  for ((i = 0; i < 600; i++)); do
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "$1: no answer in 2 minutes (see the logs in $out)" >&2
  exit 1
}

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "$peer/stop.sh" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# aitier: one server per build, an empty database each.
names=(A B)
urls=()
start_aitier() { # bin port name: starts it, prints its pid
  local db
  db=$(mktemp -u "/tmp/aitier-table-$3-XXXXXX.db")
  # shellcheck disable=SC2086  # FLAGS is split into words on purpose
  "$1" --port "$2" --database-url "sqlite://$db" ${FLAGS:-} >"$out/server-$3.log" 2>&1 &
  echo $!
}
for i in "${!bins[@]}"; do
  port=$(free_port)
  pids+=("$(start_aitier "${bins[$i]}" "$port" "${names[$i]}")")
  urls+=("http://127.0.0.1:$port")
done
# The peer: the FastAPI app (embeddings) and a llama.cpp server per thread count.
"$peer/stop.sh" >/dev/null 2>&1 || true
"$peer/start.sh" >"$out/peer-start.log"
. "$peer/common.sh"
peer_url="http://127.0.0.1:$APP_PORT"
llama_urls=()
for t in ${LLAMA_THREADS-2 1}; do
  port=$(free_port)
  setsid "$PY" -m llama_cpp.server --model "$GGUF" --model_alias smollm2 --host 127.0.0.1 \
    --port "$port" --n_threads "$t" --n_threads_batch "$t" --n_ctx 2048 --chat_format chatml \
    --interrupt_requests False --verbose False >"$out/llama-$t.log" 2>&1 </dev/null &
  pids+=("$!")
  llama_urls+=("$t|http://127.0.0.1:$port")
done
for u in "${urls[@]}"; do ready "$u/health/ready"; done
for l in ${llama_urls[@]+"${llama_urls[@]}"}; do ready "${l#*|}/v1/models"; done

cpu=$(lscpu | sed -n 's/^Model name: *//p')
family=$(lscpu | sed -n 's/^CPU family: *//p')
model=$(lscpu | sed -n 's/^Model: *//p')
isa=$({ grep -o -w -E 'avx512_vnni|avx512f|avx2|amx_tile' /proc/cpuinfo || true; } | sort -u | xargs)
isa=${isa:-no AVX2 (SSE2)}
echo "machine: $cpu (family $family model $model), $(nproc) cores, $isa; $(date -u +%F)" | tee "$out/machine.txt"
echo "builds: ${bins[*]} ${FLAGS:-}; peer: $peer; results: $out" | tee -a "$out/machine.txt"

row() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$rows"; } # round side row value
chat_rows() { # round side url api
  local log="$out/chat-$2-$1.txt"
  "$chat" --url "$3" --api "$4" --concurrency 1,4 --reps 3 --max-tokens 128 --prefill 1000 >"$log"
  "$chat" --url "$3" --api "$4" --concurrency 1 --reps 2 --max-tokens 512 --temperature 0.8 \
    | sed 's/^/story: /' >>"$log"
  cat "$log"
  row "$1" "$2" chat1 "$(sed -n 's/^1 streams.*decode p50 \([0-9.]*\).*/\1/p' "$log" | head -1)"
  row "$1" "$2" chat4 "$(sed -n 's/^4 streams.*aggregate p50 \([0-9.]*\).*/\1/p' "$log")"
  row "$1" "$2" ttft4 "$(sed -n 's/^4 streams.*TTFT p50 \([0-9.]*\).*/\1/p' "$log")"
  row "$1" "$2" story "$(sed -n 's/^story: 1 streams.*decode p50 \([0-9.]*\).*/\1/p' "$log")"
  row "$1" "$2" prefill "$(sed -n 's/^prefill:.*answer: \(.*\) tok\/s$/\1/p' "$log" | tr ',' '\n' | sort -n | sed -n 2p | xargs)"
}
embed_rows() { # round side url
  local n line
  for body in embed_1 embed_32; do
    n=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["texts"]))' "benches/$body.json")
    for _ in 1 2 3; do curl -fsS -o /dev/null -H 'Content-Type: application/json' --data @"benches/$body.json" "$3/api/embed"; done
    line=$(wrk -t1 -c8 -d"${secs}s" --timeout 60s -s benches/post.lua "$3/api/embed" -- "benches/$body.json" | grep '^RESULT')
    echo "embed x$n, 8 connections: $line"
    row "$1" "$2" "${body/_/}" "$(awk -v n="$n" '{sub(/rps=/, "", $2); print $2 * n}' <<<"$line")"
  done
}

for ((r = 1; r <= rounds; r++)); do
  for i in "${!urls[@]}"; do
    echo "== round $r: ${names[$i]}"
    chat_rows "$r" "${names[$i]}" "${urls[$i]}" aitier
    embed_rows "$r" "${names[$i]}" "${urls[$i]}"
  done
  for l in ${llama_urls[@]+"${llama_urls[@]}"}; do
    echo "== round $r: llama.cpp, ${l%%|*} threads"
    chat_rows "$r" "llama${l%%|*}" "${l#*|}" openai
  done
  echo "== round $r: Python peer"
  embed_rows "$r" peer "$peer_url"
  # The lone request: every server in turn, by the same client.
  # shellcheck disable=SC2046  # one --url flag per server
  "$lone" $(printf -- '--url %s ' "${urls[@]}" "$peer_url") --rounds 1 --words 10 \
    --pauses-ms 0,500 --requests 30 | sed "s/^round 1 /round $r /" | tee "$out/lone-$r.txt"
  for i in "${!urls[@]}"; do
    for p in 0 500; do
      row "$r" "${names[$i]}" "lone$p" "$(grep -F "| ${urls[$i]}/" "$out/lone-$r.txt" | sed -n "s/.*pause $p ms | client \([0-9.]*\).*/\1/p")"
    done
  done
  for p in 0 500; do
    row "$r" peer "lone$p" "$(grep -F "| $peer_url/" "$out/lone-$r.txt" | sed -n "s/.*pause $p ms | client \([0-9.]*\).*/\1/p")"
  done
done

# Memory: a fresh server per build under 64 clients mixing every route.
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
if [ "$load_secs" -gt 0 ]; then
  for i in "${!bins[@]}"; do
    port=$(free_port)
    pid=$(start_aitier "${bins[$i]}" "$port" "${names[$i]}-load")
    pids+=("$pid")
    ready "http://127.0.0.1:$port/health/ready"
    echo "== memory: ${names[$i]}"
    "$load" --url "http://127.0.0.1:$port" --clients 64 --secs "$load_secs" --pid "$pid" | tee "$out/load-${names[$i]}.txt"
    row 1 "${names[$i]}" rss_peak "$(sed -n 's/.*RSS peak \([0-9]*\) MiB.*/\1/p' "$out/load-${names[$i]}.txt")"
    row 1 "${names[$i]}" rss_steady "$(sed -n 's/.*steady (after [0-9]* s) \([0-9-]*\) MiB.*/\1/p' "$out/load-${names[$i]}.txt")"
    kill "$pid" 2>/dev/null || true
  done
fi

python3 - "$rows" "${names[@]:0:${#bins[@]}}" <<'EOF'
import collections, sys
values = collections.defaultdict(list)  # (row, side) -> values; (row, side, round) -> value
by_round = {}
for line in open(sys.argv[1]):
    rnd, side, row, value = line.rstrip("\n").split("\t")
    if not value:
        continue
    if row == "rss_steady":
        values[(row, side)].append(value)
        continue
    values[(row, side)].append(float(value))
    by_round[(row, side, rnd)] = float(value)
builds = sys.argv[2:]
# Derived: decode over 512 tokens against 128, for each side and round.
for (row, side, rnd), v in list(by_round.items()):
    if row == "story" and ("chat1", side, rnd) in by_round:
        by_round[("longer", side, rnd)] = v / by_round[("chat1", side, rnd)]
        values[("longer", side)].append(by_round[("longer", side, rnd)])
llamas = sorted({s for (_, s) in values if s.startswith("llama")})
rows = [  # row, label, unit, higher is better, peer side
    ("chat1", "1 stream x 128 tokens, decode", "tok/s", True, "llama"),
    ("story", "1 stream, 512 tokens (temperature 0.8)", "tok/s", True, "llama"),
    ("longer", "512 tokens against 128 (not slower with length)", "ratio", True, None),
    ("chat4", "4 streams x 128 tokens, aggregate", "tok/s", True, "llama"),
    ("ttft4", "4 streams, TTFT p50", "ms", False, "llama"),
    ("prefill", "prefill, ~1,000-token prompt", "tok/s", True, "llama"),
    ("embed1", "embed, 1 sentence per request", "req/s", True, "peer"),
    ("embed32", "embed, 32 sentences per request", "sentences/s", True, "peer"),
    ("lone0", "a lone 10-word request, back to back (p50)", "ms", False, "peer"),
    ("lone500", "the same after a 0.5 s pause", "ms", False, "peer"),
    ("rss_peak", "RSS peak, 64 clients mixing every route", "MiB", False, None),
    ("rss_steady", "RSS steady", "MiB", False, None),
]
def span(v, digits=None):
    if not v:
        return "-"
    if isinstance(v[0], str):
        return ", ".join(v)
    lo, hi = min(v), max(v)
    if digits is None:
        digits = 0 if hi >= 100 else 1
    elif hi < 0.1:
        digits = 3
    f = lambda x: f"{x:.{digits}f}"
    return f(lo) if f(lo) == f(hi) else f"{f(lo)}-{f(hi)}"
def peer_side(row, kind, rnd):
    """The peer's figure in a round: for llama.cpp, its better thread count."""
    if kind == "peer":
        return by_round.get((row, "peer", rnd))
    got = [by_round[(row, s, rnd)] for s in llamas if (row, s, rnd) in by_round]
    better = max if row != "ttft4" else min
    return better(got) if got else None
head = ["workload"] + builds + [("llama.cpp " + s[5:] + "t") for s in llamas] + ["Python peer"]
head += [f"{b} / peer" for b in builds]
print()
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for row, label, unit, _, kind in rows:
    cells = [f"{label} ({unit})"]
    digits = 2 if unit == "ratio" else None
    cells += [span(values.get((row, b), []), digits) for b in builds]
    cells += [span(values.get((row, s), []), digits) if kind != "peer" else "" for s in llamas]
    cells += [span(values.get((row, "peer"), []))]
    for b in builds:
        ratios = []
        for (r_, s, rnd), v in by_round.items():
            p = peer_side(row, kind, rnd) if kind else None
            if r_ == row and s == b and p:
                ratios.append(v / p)
        cells.append(span(ratios, 2) + ("x" if ratios else ""))
    print("| " + " | ".join(cells) + " |")
EOF
