# ktlab: the two commands of the README are `make lab` and `make test`.
# Everything a fresh clone needs is installed from here (never by hand).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ktlab-installed
TORCH_VERSION ?= 2.13.0
# Set TORCH_INDEX to a wheel index (e.g. PyTorch's CPU index) on machines whose pip
# cannot already find the CPU build through its configured find-links.
TORCH_INDEX ?=
HAS_NVIDIA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
ifeq ($(HAS_NVIDIA),yes)
TORCH_SPEC := torch==$(TORCH_VERSION)
else
TORCH_SPEC := torch==$(TORCH_VERSION)+cpu
endif
KERNEL_SOURCES := $(wildcard cpp/*.cpp cpp/*.h) ktlab/_kernels.pyx setup.py

.PHONY: setup lab test lint bench clean ext help browser

help:
	@echo "make lab    - set up .venv if needed and open JupyterLab on the tour notebook"
	@echo "make test   - set up .venv if needed and run the whole test suite"
	@echo "make lint   - ruff"
	@echo "make bench  - kernel and model benchmarks (tables + JSON under docs/)"

setup: $(STAMP) ext

$(STAMP): pyproject.toml setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "== installing $(TORCH_SPEC) (NVIDIA GPU: $(if $(HAS_NVIDIA),yes,no))"
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install -q "setuptools>=68" wheel "Cython>=3.0" "numpy>=1.26"
	$(BIN)/pip install -q --no-build-isolation -e ".[dev]"
	@touch $(STAMP)

# Rebuild the C++/Cython extension in place whenever a kernel source changes.
ext: $(STAMP) ktlab/.kernels-built
ktlab/.kernels-built: $(KERNEL_SOURCES) | $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace
	@touch $@

# LAB_ARGS="--no-browser --port 8899" for a headless machine.
lab: setup
	cd notebooks && ../$(BIN)/jupyter lab $(LAB_ARGS) 01_tour.ipynb

test: setup browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The real-browser test drives Debian's chromium; install it when missing and we may (root + apt).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "== installing chromium (apt) for the browser test"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "chromium could not be installed: the browser test will be skipped"; \
	  else echo "chromium not installed (needs root + apt): the browser test will be skipped"; fi; }

lint: setup
	$(BIN)/ruff check ktlab tests scripts

bench: setup
	$(BIN)/ktlab bench-experts

clean:
	rm -rf build ktlab/_kernels*.so ktlab/_kernels.cpp ktlab/.kernels-built
