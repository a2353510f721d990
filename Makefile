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

# check-cuda-build: ltdist._C built against the CUDA build of torch (no GPU needed), in its own cached venv.
CUDA_TORCH_VERSION := 2.14.1
CUDA_VENV ?= .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python
CUDA_VENV_READY := $(CUDA_VENV)/.torch-$(CUDA_TORCH_VERSION)
CUDA_BUILD := build/cuda-check

.PHONY: install system-packages demo test lint bench-kernels bench-engine clean compile-check check-cuda-build \
	gpu-bundle gpu-check compile-check-triton36

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

# Both papers: KT (the default experiment), then MPDT (MPCL backbone; KT, MPFA and their ensemble on it).
# The MPDT job skips MPFA's second retrain on empirical centres (the README's tables have it): that keeps
# the demo under 12 minutes on 2 cores (12 min 11 s with it).
demo: install system-packages
	$(PY) -m ltdist.launch --cluster local
	$(PY) -m ltdist.launch --cluster local --config configs/experiment/fmnist_lt_mpdt.yaml method.mpfa.baseline_row=false

test: install system-packages
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

bench-kernels: install
	$(PY) -m ltdist.cli bench kernels

bench-engine: install
	$(PY) -m ltdist.cli bench engine

# Every Triton kernel × autotune config × fp32/bf16 × sm_80/sm_90, compiled ahead of time (QUICK=1: the CI subset).
compile-check: install
	$(PY) -m ltdist.kernels.compile_check $(if $(QUICK),--quick) --out runs/compile_check.json

# The same compile check against the GPU node's Triton (3.6): its wheel in .triton36/ (no venv: it comes
# first on PYTHONPATH, before the .venv's Triton; the CPU torch of .venv is used as is).
TRITON36 := .triton36
compile-check-triton36: install
	test -d $(TRITON36)/triton || $(PY) -m pip install -q --no-deps --target $(TRITON36) "triton==3.6.*"
	PYTHONPATH=$(abspath $(TRITON36)) $(PY) -m ltdist.kernels.compile_check $(if $(QUICK),--quick) \
	  --out runs/compile_check_triton36.json

$(CUDA_VENV_READY):
	$(PYTHON) -m venv $(CUDA_VENV)
	echo "torch==$(CUDA_TORCH_VERSION)" > $(CUDA_VENV)/constraints.txt
	$(CUDA_PY) -m pip install -q -c $(CUDA_VENV)/constraints.txt "torch==$(CUDA_TORCH_VERSION)" setuptools wheel ninja numpy
	touch $@

# Builds into $(CUDA_BUILD) (never over the .venv's in-place extension); ninja rebuilds only what changed.
check-cuda-build: $(CUDA_VENV_READY)
	FORCE_CUDA=1 MAX_JOBS=$${MAX_JOBS:-2} $(CUDA_PY) setup.py -q build_ext --build-lib $(CUDA_BUILD)/lib \
	  --build-temp $(CUDA_BUILD)/tmp
	$(CUDA_PY) kernels/cuda_build_check.py $(CUDA_BUILD)/lib

# The wheels a GPU node lacks (DeepSpeed, built here with its ops left to JIT; webdataset, submitit, OmegaConf,
# pytest and what they need, never torch) for its CPython (GPU_PYTHON_VERSION) on manylinux x86-64, into the
# git-ignored .whl/ with .whl/manifest.json (name, version, sha256, size; the total). Needs PyPI, not a GPU.
GPU_PYTHON_VERSION ?= 3.12
gpu-bundle: install
	PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) $(PY) -m ltdist.kernels.gpu_bundle build --out .whl \
	  --python-version $(GPU_PYTHON_VERSION)

# On the GPU node, with the Python of its CUDA build of torch (GPU_PY), no network: ltdist goes into that
# Python editable and without dependencies (no compiling yet), then ltdist.kernels.gpu_check installs the carried
# wheels into runs/gpu_check/site, builds ltdist._C with CUDA, runs the GPU tests, the pipeline on the GPU, the
# throughput and weight checks, and writes runs/gpu_check/gpu_check.json (under 8 minutes on one H100/H200).
# The in-place extension is then the CUDA one: rebuild it (make clean install) before using .venv again here.
GPU_PY ?= python3
gpu-check:
	LTDIST_NO_EXTENSION=1 $(GPU_PY) -m pip install -q --no-index --no-build-isolation --no-deps -e .
	$(GPU_PY) -m ltdist.kernels.gpu_check --out runs/gpu_check

clean:
	rm -rf build *.egg-info ltdist/_C*.so $(INSTALLED)
