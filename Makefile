# Quick start: `make demo` trains, shrinks and exports; `make test` lints and tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR := /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test lint data install clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python3 -m venv failed: installing python3-venv"; \
	  apt-get update && apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist; without apt (or root) the
# code falls back to keras.datasets.fashion_mnist.
data:
	@if [ -f $(DATA_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST found in $(DATA_DIR)"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update && apt-get install -y dataset-fashion-mnist; \
	else \
	  echo "dataset-fashion-mnist not installed: falling back to keras.datasets"; \
	fi

demo: install data
	$(PY) train.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install data lint
	$(VENV)/bin/pytest -q -n 2 --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
