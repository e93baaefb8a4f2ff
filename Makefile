# Quick start:
#   make run DATASET=~/pictures   # set everything up, run the daemon on a folder
#   make test                     # set everything up, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATASET ?=
PYTEST_ARGS ?=
# Optional parts installed into the venv; the tests need all of them (ray: the
# backfill's tests on a local Ray instance).
EXTRAS ?= test,vlm,people,ray

.PHONY: setup system-deps run test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

setup: $(VENV)/.installed

# systemd-analyze checks the unit files in the tests (Debian's systemd package
# provides it without systemd running).
system-deps:
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null; \
	  else \
	    echo "systemd-analyze missing: install your distribution's systemd package" >&2; exit 1; \
	  fi; }

run: setup
	@test -n "$(DATASET)" || { echo "usage: make run DATASET=/path/to/images" >&2; exit 2; }
	$(VENV)/bin/captiond run --watch "$(DATASET)"

test: setup system-deps
	HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check daemon tests bench
	$(VENV)/bin/ruff format --check daemon tests bench

bench: setup
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache bench/.data
