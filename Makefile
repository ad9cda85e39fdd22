# Quick start: `make demo` trains, shrinks and exports; `make test` lints and tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_DIR := /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=
export TF_CPP_MIN_LOG_LEVEL ?= 2

# The backend-neutral core, tested again on JAX (and on PyTorch by
# `make test-torch`): its test modules and its modules' doctests. The deep
# ResNet variants of the shrink test (the same graph code as ResNet-20, and
# minutes of XLA compilation) run on TensorFlow only. `train.py` on JAX, with
# TensorFlow hidden and data parallelism, runs in tests/test_backends.py.
CORE_TESTS := tests/test_wrapper.py tests/test_callback.py tests/test_prune.py \
	tests/test_shrink.py tests/test_graph.py tests/test_flops.py \
	tests/test_patterns.py tests/test_softness.py tests/test_criteria.py \
	tests/test_allocation.py tests/test_model_zoo_patterns.py \
	tests/test_latency_table.py tests/test_fold.py tests/test_batch_norm.py \
	tests/test_distill.py tests/test_sparsity.py tests/test_fixtures.py \
	tests/test_engine.py tests/test_machine.py \
	keras_sfp/core keras_sfp/graph keras_sfp/allocation keras_sfp/recovery \
	keras_sfp/latency
CORE_SELECT := -k "not resnet32 and not resnet56 and not resnet110"

.PHONY: demo test test-jax test-torch lint data install clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python3 -m venv failed: installing python3-venv"; \
	  apt-get update && apt-get install -y python3-venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[tf,jax,test]"
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

# Everything on TensorFlow, then the core again on JAX. `--dist=loadfile`:
# a module's expensive module-scoped fixtures (a training run, exported
# artifacts, other backends' processes) run once, on one worker.
test: install data lint
	KERAS_BACKEND=tensorflow $(VENV)/bin/pytest -q -n 2 --dist=loadfile --durations=15 $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-jax

test-jax: install data
	KERAS_BACKEND=jax $(VENV)/bin/pytest -q -n 2 --durations=10 $(CORE_SELECT) \
	  $(CORE_TESTS) $(PYTEST_ARGS)

# PyTorch is not a test dependency: PyPI serves only its large CUDA build.
# This installs whatever `pip install torch` gives (pre-install the CPU wheel
# from download.pytorch.org to avoid the CUDA one), then runs the core on it.
test-torch: install data
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch
	KERAS_BACKEND=torch $(VENV)/bin/pytest -q -n 2 --durations=10 $(CORE_SELECT) \
	  $(CORE_TESTS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .hypothesis
