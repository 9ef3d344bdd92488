# The two commands a new user needs: `make demo` and `make test`.
# Everything installs into ./.venv; `make setup` is a no-op when the lock files have not changed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0
TORCHREC_PIN := torchrec==1.8.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-integration bench clean-var up down help

help:
	@echo "make demo   - the whole platform end to end on embedded defaults"
	@echo "make test   - set up if needed and run the test suite"
	@echo "make setup  - create .venv with the pinned stack"

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first: the CPU wheel on disk; any other torch pulls GBs of CUDA.
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -r requirements.txt
	# torchrec's metadata asks for the CUDA fbgemm-gpu, which breaks import: --no-deps.
	$(BIN)/pip install --quiet --no-deps $(TORCHREC_PIN)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/recsys demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/quality.py

up: setup
	$(BIN)/recsys up

down:
	@test -x $(BIN)/recsys && $(BIN)/recsys down || true

clean-var:
	rm -rf var
