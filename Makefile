# Quick start:
#   make run DATASET=~/pictures   # set everything up, run the daemon on a folder
#   make test                     # set everything up, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATASET ?=
PYTEST_ARGS ?=
# Test processes (pytest-xdist): "auto" is one per CPU; 0 runs the suite serially.
# Tests marked xdist_group("...") run in one process (they share a daemon).
PYTEST_WORKERS ?= auto
# Optional parts installed into the venv for `make run`; `make test` installs TEST_EXTRAS,
# all of them, whatever EXTRAS says (in CI a test skipped for a missing one fails;
# ray: the backfill's tests on a local Ray instance).
EXTRAS ?= test,vlm,people,report
TEST_EXTRAS := test,vlm,people,report,ray

# One stamp per extra, so that what is installed follows what is asked for: after
# `make run EXTRAS=test`, `make test` still installs the vlm and people extras.
comma := ,
stamps = $(VENV)/.installed-base $(foreach x,$(subst $(comma), ,$(1)),$(VENV)/.installed-$(x))

.PHONY: setup setup-test system-deps run test lint bench mutation clean
.NOTPARALLEL:

$(VENV)/.installed-base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-%: pyproject.toml $(VENV)/.installed-base
	$(PY) -m pip install --quiet -e '.[$*]'
	touch $@

setup: $(call stamps,$(EXTRAS))

setup-test: $(call stamps,$(TEST_EXTRAS))

# systemd-analyze checks the unit files in the tests (Debian's systemd package
# provides it without systemd running); chromium and chromedriver drive the web UI's
# browser tests and render the HTML report (Debian's packages: browsers cannot be
# downloaded by the tests).
system-deps:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null; \
	  else \
	    echo "systemd-analyze missing: install your distribution's systemd package" >&2; exit 1; \
	  fi; }
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null; \
	  else \
	    echo "chromium/chromedriver missing: install your distribution's chromium and chromium-driver" >&2; exit 1; \
	  fi; }

run: setup
	@test -n "$(DATASET)" || { echo "usage: make run DATASET=/path/to/images" >&2; exit 2; }
	$(VENV)/bin/captiond run --watch "$(DATASET)"

test: setup-test system-deps
	HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

lint: $(call stamps,test)
	$(VENV)/bin/ruff check daemon tests tools bench
	$(VENV)/bin/ruff format --check daemon tests tools bench

# Mutation testing of the promise-carrying modules (on demand, not CI; see TESTING.md).
# GROUPS: some of sidecars confined queue notify security postprocess (default: all).
GROUPS ?=
MUTATION_JOBS ?= 1
mutation: $(call stamps,test$(comma)mutation)
	$(PY) tools/mutation.py -j $(MUTATION_JOBS) $(GROUPS)

bench: setup
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache bench/.data
