# make demo: fresh clone -> .venv -> the demo manifest on the built-in tiny model (outputs/demo/)
# make test: fresh clone -> .venv with dev extras -> the test suite
# make lint: hadolint on the Dockerfile;  make k8s-examples: re-render k8s/examples/ (each file names its command)
# make chaos: kill runs at random moments, rerun, check the invariants (scripts/chaos.py; minutes)
# make image: build the image with podman and run the demo in it (scripts/podman_build_run.sh; root, minutes)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: install install-dev demo test chaos lint k8s-examples image bench clean

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

# Both cores (tests/README.md: the budget, the groups, the numbers); TEST_WORKERS=0 runs in this one process.
TEST_WORKERS ?= 2
test: install-dev
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=25 tests

# Kill runs at random moments of every stage, rerun, check the invariants (scripts/chaos.py); minutes.
CHAOS_ROUNDS ?= 40
CHAOS_SEED ?= 0
chaos: install-dev  # the s3 scenario runs a moto server (a dev extra)
	$(BIN)/python scripts/chaos.py --rounds $(CHAOS_ROUNDS) --seed $(CHAOS_SEED)

lint: install-dev
	$(BIN)/hadolint Dockerfile

k8s-examples: install
	@for f in k8s/examples/*.yaml; do \
	  cmd=$$(sed -n 2p $$f); cmd=$${cmd#\# dbbatch }; \
	  eval "$(BIN)/dbbatch $$cmd" > $$f.tmp && mv $$f.tmp $$f && echo "rendered $$f"; \
	done

image:
	scripts/podman_build_run.sh

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf outputs .pytest_cache
