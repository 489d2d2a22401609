# `make demo` and `make test` each create the virtual environment when it is missing.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test test-all browser bench clean-artifacts

$(BIN)/agelens: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dask]'
	touch $@

# The whole study on the built-in demo data, with the demo preset (small model, 64 px).
demo: $(BIN)/agelens
	$(BIN)/agelens run --preset demo

# Tests marked slow (real Prefect servers and workers) run where CI is set: `.ci/run` sets it.
test: $(BIN)/agelens browser
	$(BIN)/python -m pytest -q

test-all: $(BIN)/agelens browser
	CI=1 $(BIN)/python -m pytest -q

# Headless Chromium, for the test that looks at Prefect's UI; installed where apt-get can (as root).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	    apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium is not installed: the test of the UI will be skipped (apt-get install chromium)"

# Smoke runs of every benchmark (each prints what it compared, on which machine, and the ratio).
bench: $(BIN)/agelens
	$(BIN)/python bench/extract_speed.py --quick
	$(BIN)/python bench/cached_rerun.py --quick
	$(BIN)/python bench/train_throughput.py --quick
	$(BIN)/python bench/explain_cost.py --quick
	$(BIN)/python bench/predict_speed.py --quick
	$(BIN)/python bench/quality.py --quick
	$(BIN)/python bench/scale.py --images 2000 --image-size 64

clean-artifacts:
	rm -rf artifacts/*/ artifacts/.cache artifacts/.agelens
