# One venv, installed once per change of pyproject.toml; `make demo` and `make test` both start here.
# pip byte-compiles what it installs on one core (about 50 s for torch, DeepSpeed, transformers, ...):
# compileall does it on every core instead (about 30 s on 2). Like pip, it passes over the files that do not
# compile on this Python (torch's tests for 3.12 syntax), which make it exit 1.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-all bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -e '.[dev]'
	$(PY) -m compileall -q -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') > /dev/null || true
	touch $(STAMP)

install: $(STAMP)

# a fresh run directory each time, so `make demo` can be run again (same seed: same table)
demo: install
	$(VENV)/bin/accelerate launch recipes/distill.py --output-dir runs/demo-$$(date +%Y%m%d-%H%M%S)

# two workers: the 2-process launches leave a core idle while they start and wait (tests/conftest.py keeps
# the tests that share a reference run on one worker, so the run is made once); in the order conftest.py
# sorts them (groups with an end-to-end run first), not xdist's own (groups with the most tests first)
PYTEST := $(PY) -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder

# what CI runs; `test-all` adds the zoo's larger family siblings at full width (tests/test_zoo_coverage.py)
test: install
	$(PYTEST) -m "not exhaustive"

test-fast: install
	$(PYTEST) -m "not slow and not exhaustive"

test-all: install
	$(PYTEST)

clean:
	rm -rf runs .pytest_cache
