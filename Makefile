# One command each: `make run` installs and serves, `make test` installs and runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint typecheck pytest bench faults clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch is pinned to ==2.13.0 in pyproject.toml: its CPU wheel is found locally (pip find-links)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(STAMP)

run: install
	$(BIN)/sgd-service serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# The web page is tested in Debian's chromium, driven by Playwright (never `playwright install`).
.PHONY: browser-deps
browser-deps:
	@test -x /usr/bin/chromium || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

pytest: install browser-deps
	$(BIN)/pytest

test: lint typecheck pytest

# The fault test of `make test` (20 kills of the training worker), 200 times over.
faults: install
	SGD_FAULT_ROUNDS=200 $(BIN)/pytest -s tests/test_faults.py -k random_moments

bench: install
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis artifacts
