# Every target sets up .venv when it is missing, then runs inside it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup test test-gpu demo demo-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

test: setup
	$(PY) -m pytest -q tests

# CUDA-only tests (tests/gpu); collected only where torch sees a GPU
test-gpu: setup
	$(PY) -m pytest -q tests/gpu

demo: setup
	$(PY) tools/demo.py $(DEMO_ARGS)

bench: setup
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf output .pytest_cache
