# elise: make help
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MOSHI := moshi==0.2.13
RESEMBLYZER := resemblyzer==0.1.4  # offline speaker embeddings (elise.evaluate); deps in the eval extra
export PYTHONHASHSEED := 0

.PHONY: help install lock conda demo test test-full test-browser lint bench gpu-check clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	# moshi pins torch<2.10; what its Mimi code imports is in our dependencies (and the lock).
	$(BIN)/pip install -q --no-deps $(MOSHI) $(RESEMBLYZER)
	touch $(STAMP)

install: $(STAMP)  ## create .venv with the locked versions (requirements.lock) and elise (idempotent)

lock:  ## after changing dependencies: resolve pyproject's ranges in .venv, rewrite requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-build-isolation -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(MOSHI) $(RESEMBLYZER)
	$(BIN)/python scripts/lock.py
	touch $(STAMP)

conda:  ## GPU machines: conda env `elise` (CUDA torch, the locked versions, elise, moshi)
	conda env create -f environment.yml
	conda run -n elise pip install --no-deps $(MOSHI) $(RESEMBLYZER)

demo: install  ## train a tiny model on the bundled clips, then synthesize a wav (ARGS="out=<dir> key=value")
	$(BIN)/python -m elise.demo $(ARGS)

test: install  ## fast test tier (CPU, offline), one worker per core
	@command -v espeak-ng >/dev/null || echo "note: no espeak-ng (apt-get install espeak-ng): the voice-similarity tests are skipped"
	$(BIN)/python -m pytest -q -x -n auto tests

test-full: install  ## every test, slow tier included
	$(BIN)/python -m pytest -q -n auto -m "" tests

test-browser: install  ## the server's page in the system Chromium (apt install chromium); screenshot in outputs/
	ELISE_BROWSER_OUT=outputs/test-browser $(BIN)/python -m pytest -q -m browser tests/serve

lint: install  ## ruff + mypy
	$(BIN)/ruff check elise tests train.py synthesize.py serve.py
	$(BIN)/ruff format --check elise tests train.py synthesize.py serve.py
	$(BIN)/mypy elise

bench: install  ## speed figures (see BENCHMARKS.md); make bench ARGS="part=synth quick=true"
	$(BIN)/python -m elise.bench $(ARGS)

gpu-check: install  ## on a CUDA machine: GPU bench, int4 on CUDA, DDP bf16 demo, test suite (scripts/gpu_check.sh)
	PY=$(BIN)/python scripts/gpu_check.sh

clean:  ## remove the venv and caches
	rm -rf $(VENV) .cache outputs multirun
