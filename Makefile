# make demo: fresh clone -> .venv -> the demo manifest on the built-in tiny model (outputs/demo/)
# make test: fresh clone -> .venv with dev extras -> the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: install install-dev demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(BIN)/python
	$(PIP) install -q -c constraints.txt -e .

install-dev: $(BIN)/python
	$(PIP) install -q -c constraints.txt -e '.[dev]'

demo: install
	$(BIN)/python scripts/make_demo_images.py
	$(BIN)/dbbatch run manifests/demo.yaml

test: install-dev
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf outputs .pytest_cache
