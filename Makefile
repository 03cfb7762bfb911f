# The README's commands. Each installs what it needs on a fresh machine.
#   make test   - every test layer (unit, chart, integration, e2e)
#   make demo   - the main job end to end on the local cluster stand-in (MODE=containers: from the images)
#   make bench  - benchmarks (not part of make test)
#   make images - the trainer and operator images, built with podman (cached by their inputs)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all venv tools images test test-fast demo bench clean

all: test

# The venv, with every dependency pinned by constraints.txt (torch==2.13.0
# is the CPU build on this machine's disk).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade 'pip>=24'
	$(PY) -m pip install -q -c constraints.txt -e '.[operator,trainer,dev]'
	touch $(STAMP)

venv: $(STAMP)

# System and binary tools the stand-in and chart tests use (see localcluster/README.md).
tools: $(STAMP)
	$(PY) -m localcluster.tools install

# Both product images from their unchanged Dockerfiles, on local bases (no
# registry is reachable here); a run whose inputs did not change takes seconds.
images: venv tools
	$(PY) -m localcluster.images build

test: venv tools images
	$(PY) tests/run.py $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

# make demo MODE=containers: the operator and the job's pods from the two images.
MODE ?= processes
demo: venv tools $(if $(filter containers,$(MODE)),images)
	$(PY) -m localcluster.demo --mode $(MODE)

bench: venv tools
	$(PY) bench/snapshot.py
	$(PY) bench/recovery.py
	$(PY) bench/scale.py --lock

clean:
	rm -rf $(VENV) .tools .localcluster
