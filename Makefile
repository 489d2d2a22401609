# `make demo` and `make test` each create the virtual environment when it is missing.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Small settings so the whole demo study runs in minutes on a 2-core CPU.
DEMO_ARGS ?= --backbone convnext_narrow --image-size 64 --epochs 12 --lr 3e-4

.PHONY: demo test bench clean-artifacts

$(BIN)/agelens: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dask]'
	touch $@

demo: $(BIN)/agelens
	$(BIN)/agelens run $(DEMO_ARGS)

test: $(BIN)/agelens
	$(BIN)/python -m pytest -q

bench: $(BIN)/agelens
	$(BIN)/python bench/extract_speed.py

clean-artifacts:
	rm -rf artifacts/*/ artifacts/.cache
