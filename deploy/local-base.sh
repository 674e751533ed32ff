#!/bin/sh
# Base images for building the xllm image on a machine that cannot pull from an image registry
# (the Dockerfile's default, python:3.11-slim, comes from Docker Hub). Run as root, with Docker running:
#
#   deploy/local-base.sh                # makes the two images below; skips any that already exists
#   XLLM_BASE_IMAGE=xllm-base:bookworm XLLM_BUILDER_IMAGE=xllm-base:bookworm-build \
#   XLLM_TORCH_PIP_ARGS="--find-links /wheels" docker compose up --build
#
# xllm-base:bookworm        Debian bookworm (debootstrap --variant=minbase) with python3, venv and pip,
#                           straight from the Debian mirror: the final image's base.
# xllm-base:bookworm-build  that, plus what the Dockerfile's builder stage needs beyond a python:3.11-slim:
#                           a C++ compiler and Python's headers (Debian keeps them in python3-dev), for
#                           the engine's kernels; the CPU torch wheel from pip's find-links folder
#                           (PIP_FIND_LINKS, default /opt/wheels) in /wheels, for where PyTorch's own index
#                           is unreachable (without it, "--find-links /wheels" finds nothing and pip takes
#                           PyPI's torch, the CUDA build); and pip's CA bundle (PIP_CERT) where a TLS proxy
#                           stands between this machine and PyPI. Only the builder stage sees this image:
#                           nothing of it reaches the final image but the venv.
set -eu

BASE=${1:-xllm-base:bookworm}
BUILD=${2:-xllm-base:bookworm-build}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEELS=${PIP_FIND_LINKS:-/opt/wheels}
TORCH=torch==2.13.0 # pyproject.toml's pin

exists() { docker image inspect "$1" >/dev/null 2>&1; }

if exists "$BASE"; then
  echo "$BASE: already there"
else
  command -v debootstrap >/dev/null || { echo "debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }
  root=$(mktemp -d /var/tmp/xllm-rootfs.XXXXXX)
  trap 'rm -rf "$root"' EXIT
  echo "$BASE: debootstrap bookworm into $root (about a minute)"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm "$root" "$MIRROR" >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import --change 'CMD ["python3"]' - "$BASE" >/dev/null
  rm -rf "$root"
  trap - EXIT
  echo "$BASE: imported"
fi

if exists "$BUILD"; then
  echo "$BUILD: already there"
  exit 0
fi
context=$(mktemp -d /var/tmp/xllm-build-context.XXXXXX)
trap 'rm -rf "$context"' EXIT
mkdir "$context/wheels"
# torch's wheel if pip's find-links folder has it (a hard link where it can, the wheel is ~200 MB)
wheel=$(find "$WHEELS" -maxdepth 1 -name "torch-${TORCH#torch==}+cpu-*cp311*.whl" 2>/dev/null | head -n 1)
if [ -n "$wheel" ]; then
  ln "$wheel" "$context/wheels/" 2>/dev/null || cp "$wheel" "$context/wheels/"
fi
# pip's CA bundle when one is configured (a TLS proxy's CA), else the image's own
if [ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ]; then
  cp "$PIP_CERT" "$context/pip-ca.crt"
  cert='ENV PIP_CERT=/etc/ssl/certs/pip-ca.crt'
else
  : >"$context/pip-ca.crt"
  cert=''
fi
cat >"$context/Dockerfile" <<EOF
FROM $BASE
RUN apt-get update \\
 && apt-get install -y --no-install-recommends g++ python3-dev \\
 && rm -rf /var/lib/apt/lists/*
COPY wheels/ /wheels/
COPY pip-ca.crt /etc/ssl/certs/pip-ca.crt
$cert
EOF
echo "$BUILD: building (g++, python3-dev${wheel:+, $(basename "$wheel")}${cert:+, pip's CA bundle})"
docker build -q -t "$BUILD" "$context" >/dev/null
echo "$BUILD: built"
