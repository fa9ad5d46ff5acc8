# Every target sets up .venv when it is missing, then runs inside it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# a venv with torch's CUDA build takes about 6 GiB: say so before pip fails half-way with "No space left"
MIN_FREE_GIB ?= 7
export DISK_CHECK := import shutil, sys; free = shutil.disk_usage("$(VENV)").free / 2**30; \
    sys.exit(0 if free >= $(MIN_FREE_GIB) else f"only {free:.1f} GiB free on the disk of $(VENV), under \
    MIN_FREE_GIB=$(MIN_FREE_GIB): a venv with torch takes about 6 GiB; free some space (old clones, venvs, /tmp) \
    or set VENV=/a/larger/disk/venv")

.PHONY: setup test test-browser test-oldest test-gpu gpu-wheels demo demo-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch, torchvision" 2>/dev/null || { $(PY) -c "$$DISK_CHECK" && \
	    $(PY) -m pip install -q $(TORCH_PINS); }
	$(PY) -m pip install -q -e ".[dev]"
	@touch $@

test: setup
	$(PY) -m pytest -q tests

# the vild-serve page in a real browser: Debian's chromium (from apt: playwright's own browser downloads are
# not needed) driven by playwright; `make test` skips this test when either is missing
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-browser: setup
	@command -v chromium >/dev/null || { echo "installing Debian's chromium (apt-get)"; \
	    $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }
	@$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install -q "playwright>=1.40"
	VILD_BROWSER_TEST=1 $(PY) -m pytest -q tests/test_serve_browser.py

# the suite on the oldest Python and torch vild supports, in its own venv (PyPI's CUDA build of torch:
# about 2.5 GB to download)
OLDEST_PYTHON ?= python3.10
OLDEST_TORCH ?= torch==2.4.1 torchvision==0.19.1
test-oldest:
	$(MAKE) PYTHON=$(OLDEST_PYTHON) VENV=.venv-oldest TORCH_PINS="$(OLDEST_TORCH)" test

# CUDA-only tests (tests/gpu); collected only where torch sees a GPU
test-gpu: setup
	$(PY) -m pytest -q tests/gpu

# wheels a lent GPU machine (no package index there, Python 3.12) lacks, into .whl/ for `run`'s carry;
# then, there: bash benchmarks/gpu_check.sh (see benchmarks/README.md)
GPU_WHEELS ?= open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 pycocotools==2.0.11 lvis==0.5.3
gpu-wheels:
	@grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl $(GPU_WHEELS)

demo: setup
	$(PY) tools/demo.py $(DEMO_ARGS)

bench: setup
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf output .pytest_cache
