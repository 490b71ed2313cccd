# GSPN-DiT: the two set-up commands are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RESULTS ?= benchmarks/results
# torch.compile's kernels are cached inside the project so repeated runs are fast.
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
# Idle OpenMP threads spin ~10k times, then sleep (dit_gspn/commands/demo.py says why).
export GOMP_SPINCOUNT ?= 10000
# The package finds CUDA as torch does: CUDA_HOME, else the nvcc on PATH. On this project's machines that
# nvcc is a wrapper in /usr/local/bin (torch would guess /usr/local, which lacks libcudart): name the toolkit.
ifeq ($(origin CUDA_HOME),undefined)
CUDA_HOME := $(firstword $(wildcard /usr/local/cuda-13.0))
endif
ifneq ($(CUDA_HOME),)
export CUDA_HOME
endif

.PHONY: venv test test-fast demo build-ext gpu-check wheels clean

venv: $(VENV)/.installed  ## create or refresh .venv with the pinned versions (quick when nothing changed)

# -qq: pip says only what failed (a machine's pip.conf naming index folders it lacks made -q print one
# warning per package, which a newcomer cannot act on).
$(VENV)/.installed: requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -qq --disable-pip-version-check --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
	@touch $@

test: venv  ## the whole CPU test suite (what CI runs)
	$(PY) -m pytest -q

# The unit tests mirror the source tree (tests/dit_gspn/, tests/evaluation/); the compiled kernels (tests/kernels/),
# the commands run end to end (tests/integration/) and the benchmark scripts (tests/tools/) run in `make test`.
test-fast: venv  ## the unit tests without the slow ones: the loop while editing (under 3 minutes on 2 cores)
	$(PY) -m pytest -q -m "not slow" tests/dit_gspn tests/evaluation

demo: venv  ## train a small GSPN-DiT on the built-in dataset, sample a labelled grid, print where it all went
	$(VENV)/bin/dit-gspn-demo

build-ext: venv  ## compile the scan kernels ahead of time (CPU; add the CUDA build with `make build-ext CUDA=1`)
	$(PY) -m dit_gspn.ops.build $(if $(CUDA),--cuda,)

# On a GPU machine whose python already has torch (no venv is built): build the CUDA kernels, run the
# `cuda` tests, the parity summary, both benchmarks and tiny compute-sanitizer runs, each under its own
# timeout within DEADLINE seconds, and write the log, JSON results and plot to $(OUT) (at most 8 files).
# TORCH_CUDA_ARCH_LIST (default 9.0) is exported to every step, so the tests load the one build.
OUT ?= $(RESULTS)/gpu-check
DEADLINE ?= 480
gpu-check:  ## on a GPU machine: the whole device check in one call (README, "On a GPU")
	$(PYTHON) -m benchmarks.gpu_check --out $(OUT) --deadline $(DEADLINE) --wheels $(CURDIR)/.whl

# The packages the GPU image lacks, at the versions requirements.lock pins, as wheels for its Python
# 3.12 into .whl/ (git-ignored; carry it to the device). gpu-check installs them into a temporary folder.
WHEELS ?= diffusers torch_fidelity importlib_metadata lazy-importer zipp regex omegaconf
space := $(subst ,, )
wheels:  ## download the wheels the GPU image lacks into .whl/
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d .whl \
		$$(grep -E '^($(subst $(space),|,$(strip $(WHEELS))))==' requirements.lock)

clean:
	rm -rf .cache build *.egg-info
