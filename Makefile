# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs (torch==2.13.0 first, so no
# dependency range can pull a newer, multi-GB torch).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lstmkit-installed

SUDO   := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: demo test lint bench clean browser

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,plot,tasks,interop,gpu,peers]"
	# The peers' sLSTM and LSTM with heads, for tests/test_peers.py: their PyTorch paths need only torch
	# (and einops, above); --no-deps keeps their CUDA-side requirements (mlstm_kernels, …) and any
	# torch they might pull away.
	$(PY) -m pip install -q --no-deps flashrnn==1.0.8 xlstm==2.0.6
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lstmkit demo

# The report's screenshot test renders it in a real headless browser: Debian's chromium.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { echo "installing chromium (Debian package) for the report's browser test"; \
	    $(SUDO) apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }

# The suite runs in TEST_WORKERS processes (pytest-xdist; CI's 2 cores): its tests are single-threaded.
# worksteal: a worker that runs out of tests takes half of another's queue, so the two end together
# (the tests take from milliseconds to half a minute each).
TEST_WORKERS ?= 2

# The fused CPU kernel is compiled first (a minute, once per machine and kernel source; seconds when
# it is built already): otherwise the first test that needs it compiles it while the other workers
# wait for it. A failed build does not stop the target: the suite then runs as it would without it.
test: $(STAMP) browser
	-$(PY) -m lstmkit build
	$(PY) -m pytest -n $(TEST_WORKERS) --dist worksteal
	$(VENV)/bin/ruff check src tests benchmarks tools

bench: $(STAMP)
	$(PY) benchmarks/bench_kernels.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
