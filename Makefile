# GSPN-DiT: the two set-up commands are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RESULTS ?= benchmarks/results
# torch.compile's kernels are cached inside the project so repeated runs are fast.
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
# Idle OpenMP threads spin ~10k times, then sleep (dit_gspn/demo.py says why).
export GOMP_SPINCOUNT ?= 10000

.PHONY: venv test demo build-ext gpu-check clean

venv: $(VENV)/.installed  ## create or refresh .venv with the pinned versions (quick when nothing changed)

$(VENV)/.installed: requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
	@touch $@

test: venv  ## the whole CPU test suite (what CI runs)
	$(PY) -m pytest -q

demo: venv  ## train a small GSPN-DiT on the built-in dataset, sample a labelled grid, print where it all went
	$(PY) -m dit_gspn.demo

build-ext: venv  ## compile the scan kernels ahead of time (CPU; add the CUDA build with `make build-ext CUDA=1`)
	$(PY) -m dit_gspn.ops.build $(if $(CUDA),--cuda,)

# On a GPU machine whose python already has torch (no venv is built): build the CUDA kernels,
# run the `cuda`-marked tests and the benchmarks, and write JSON results to $(RESULTS).
gpu-check:
	mkdir -p $(RESULTS)
	PYTHONPATH=$(CURDIR):$$PYTHONPATH TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0} $(PYTHON) -m dit_gspn.ops.build --cuda
	PYTHONPATH=$(CURDIR):$$PYTHONPATH $(PYTHON) -m pytest -q -m cuda tests
	PYTHONPATH=$(CURDIR):$$PYTHONPATH $(PYTHON) benchmarks/bench_scan.py --out $(RESULTS)/bench_scan_gpu.json
	PYTHONPATH=$(CURDIR):$$PYTHONPATH $(PYTHON) benchmarks/bench_model.py --out $(RESULTS)/bench_model_gpu.json --plot $(RESULTS)/bench_model_gpu.png

clean:
	rm -rf .cache build *.egg-info
