#!/usr/bin/env bash
# xllm-py vs llama.cpp's llama-server on the same SmolLM2 GGUF, same workload, one after the other in
# one run: 128 in / 128 out (EOS ignored, chat endpoint, fresh salts), concurrency 1, 8 and 32.
#
#   PYTHON=.venv/bin/python benchmarks/compare_llama_cpp.sh [xllm modes, default: colocated]
#
# Needs .llama.cpp/bin/llama-server (benchmarks/build_llama_server.sh). Results (JSON, PNG) go to
# bench-results/compare-*; the summary table is printed at the end.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
MODES="${*:-colocated}"
OUT="${OUT:-bench-results}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# requests per concurrency level: enough for a steady state, bounded in time
declare -A PROMPTS=([1]=8 [8]=32 [32]=64)

wait_up() {  # url
  for _ in $(seq 600); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "not up: $1" >&2; return 1
}

bench() {  # name base-url
  for c in 1 8 32; do
    "$PYTHON" -m xllm.bench.serve --base-url "$2" --input-len 128 --output-len 128 --ignore-eos \
      --max-concurrency "$c" --num-prompts "${PROMPTS[$c]}" --warmup 2 --timeout 600 --no-progress \
      --result-dir "$OUT" --result-name "compare-$1-c$c" >/dev/null
  done
}

PORT=8080 benchmarks/run_llama_server.sh >"$OUT.llama.log" 2>&1 &
LLAMA=$!
trap 'kill $LLAMA 2>/dev/null || true' EXIT
mkdir -p "$OUT"
wait_up http://127.0.0.1:8080/health
bench llama.cpp http://127.0.0.1:8080
kill $LLAMA; wait $LLAMA 2>/dev/null || true

for mode in $MODES; do
  "$PYTHON" -m xllm.cli up --mode "$mode" --port 8000 --state-dir "$OUT/state-$mode" \
    --kv-cache-fraction 0.05 >"$OUT/xllm-$mode.log" 2>&1 &
  UP=$!
  wait_up http://127.0.0.1:8000/health
  bench "xllm-$mode" http://127.0.0.1:8000
  kill -TERM $UP; wait $UP || true
done

"$PYTHON" - "$OUT" llama.cpp $(printf 'xllm-%s ' $MODES) <<'PY'
import json, sys
out, names = sys.argv[1], sys.argv[2:]
print(f"{'server':<18} {'conc':>4} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9}  (ms)")
for name in names:
    for c in (1, 8, 32):
        s = json.load(open(f"{out}/compare-{name}-c{c}.json"))["runs"][0]["summary"]
        t, p = s["ttft_ms"], s["tpot_ms"]
        print(f"{name:<18} {c:>4} {s['output_throughput']:>9.1f} {t['p50']:>9.0f} {t['p99']:>9.0f} "
              f"{p['p50']:>9.1f} {p['p99']:>9.1f}   failed {s['failed']}")
PY
