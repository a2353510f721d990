# The two commands a user needs:  make demo  (the embedded default experiment, end to end)
#                                 make test  (the test suite)
# Both install what is missing first: a .venv with torch $(TORCH_VERSION) (never a newer one), ltdist
# (editable, with its C++ extension) and, when run as root, the Debian packages the tests and the demo use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
CONSTRAINTS := $(VENV)/constraints.txt
INSTALLED := $(VENV)/.ltdist-installed
DEB_PACKAGES := slurm-wlm munge dataset-fashion-mnist
PYTEST_ARGS ?=

.PHONY: install system-packages demo test lint bench-kernels bench-engine clean

install: $(INSTALLED)

$(PY):
	$(PYTHON) -m venv $(VENV)

# A constraint file pins torch for every later pip call: nothing may resolve a newer torch.
$(CONSTRAINTS): | $(PY)
	echo "torch==$(TORCH_VERSION)" > $@
	$(PY) -m pip install -q -c $@ "torch==$(TORCH_VERSION)"

$(INSTALLED): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) | $(CONSTRAINTS)
	PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) $(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	# DeepSpeed's JIT ops, built now so no run ever waits on torch's extension lock (ltdist/engine/ds_ops.py).
	$(PY) -m ltdist.engine.ds_ops
	touch $@

system-packages:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "note: Debian packages missing ($$missing); as root: apt-get install -y $$missing" \
	       "(tests that need them are skipped)"; exit 0; fi; \
	echo "installing Debian packages: $$missing"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null

demo: install system-packages
	$(PY) -m ltdist.launch --cluster local

test: install system-packages
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

bench-kernels: install
	$(PY) -m ltdist.kernels.bench

bench-engine: install
	$(PY) -m ltdist.engine.bench

clean:
	rm -rf build *.egg-info ltdist/_C*.so $(INSTALLED)
