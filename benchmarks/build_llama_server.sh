#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (the peer for `xllm bench serve` comparisons) from the llama.cpp
# sources vendored in the llama-cpp-python sdist. Nothing is committed: the sources live in a temp dir
# and the binary lands in <repo>/.llama.cpp/ (gitignored). Takes ~7 minutes on 2 cores.
#
#   benchmarks/build_llama_server.sh            # uses the newest llama-cpp-python sdist
#   LLAMA_CPP_PYTHON_VERSION=0.3.16 JOBS=4 benchmarks/build_llama_server.sh
#   LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON ..." benchmarks/build_llama_server.sh   # more cmake args
# On a VM whose CPU lists AMX but does not enable it, the native build dies with "Illegal instruction":
# build without AMX (docs/performance.md §12 says which flags were used).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${PREFIX:-$REPO/.llama.cpp}"
JOBS="${JOBS:-2}"
PIP="${PIP:-${PYTHON:-python3} -m pip}"
SPEC="llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==$LLAMA_CPP_PYTHON_VERSION}"

WORK="$(mktemp -d -t llama-build.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

echo "== downloading the $SPEC sdist into $WORK"
$PIP download --no-deps --no-binary :all: --dest "$WORK" "$SPEC"
SDIST="$(find "$WORK" -maxdepth 1 -name 'llama*cpp*python-*.tar.gz' | head -n1)"
[ -n "$SDIST" ] || { echo "no llama-cpp-python sdist in $WORK" >&2; exit 1; }
tar -xzf "$SDIST" -C "$WORK"
SRC="$(find "$WORK" -mindepth 3 -maxdepth 3 -type d -path '*/vendor/llama.cpp' | head -n1)"
[ -n "$SRC" ] || { echo "no vendor/llama.cpp in $SDIST" >&2; exit 1; }
echo "== llama.cpp sources: $SRC"

# LLAMA_USE_PREBUILT_UI=OFF: the default downloads the web UI assets (no internet here).
# LLAMA_CURL=OFF: no libcurl needed (models are local files).
cmake -S "$SRC" -B "$WORK/build" -G "Unix Makefiles" \
  -DCMAKE_BUILD_TYPE=Release \
  -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF \
  -DBUILD_SHARED_LIBS=OFF \
  ${LLAMA_CMAKE_ARGS:-}
cmake --build "$WORK/build" --target llama-server -j "$JOBS"

mkdir -p "$PREFIX/bin"
install -m 0755 "$WORK/build/bin/llama-server" "$PREFIX/bin/llama-server"
basename "$SDIST" > "$PREFIX/SOURCE"
echo "== installed $PREFIX/bin/llama-server (from $(cat "$PREFIX/SOURCE"))"
