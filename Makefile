# One command each: `make run` installs and serves, `make test` installs and runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SERVE_STAMP := $(VENV)/.serve-stamp
DEV_STAMP := $(VENV)/.dev-stamp
PIP := $(BIN)/pip install --quiet --disable-pip-version-check
# torch as pyproject.toml pins it; TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes the
# CPU build from PyTorch's index (the default index's is CUDA, several GB), as the Dockerfile does
TORCH := $(shell grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')
TORCH_INDEX_URL ?=

.PHONY: install run test lint typecheck pytest bench faults chaos clean constraints

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# `make run` installs what serving needs, nothing more
$(SERVE_STAMP): pyproject.toml | $(BIN)/python
	$(if $(TORCH_INDEX_URL),$(PIP) --index-url $(TORCH_INDEX_URL) '$(TORCH)')
	$(PIP) -e .
	touch $@

# tests, linters, the bench: the dev extras on top
$(DEV_STAMP): $(SERVE_STAMP)
	$(PIP) -e '.[dev]'
	touch $@

install: $(DEV_STAMP)

run: $(SERVE_STAMP)
	$(BIN)/sgd-service serve

# lint-imports: the layers and the torch/matplotlib/web-framework rules ([tool.importlinter] in
# pyproject.toml); no cache directory left behind, the graph takes a fraction of a second
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

typecheck: install
	$(BIN)/mypy

# The web page is tested in Debian's chromium, driven by Playwright (never `playwright install`).
.PHONY: browser-deps
browser-deps:
	@test -x /usr/bin/chromium || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

# The Redis tests start their own redis-server (Debian's package) on a free port. Installed here
# when missing; Debian starts it as a service on 6379, which nothing here uses: stop that one.
.PHONY: redis-deps
redis-deps:
	@command -v redis-server >/dev/null || ( \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server \
	  && (systemctl disable --now redis-server 2>/dev/null || service redis-server stop 2>/dev/null || true))

# Three pytest-xdist workers on 2 cores: most tests wait on servers, workers and Redis, not the
# CPU. worksteal: a worker that runs out of tests takes half of another's that remain, so the
# workers end together without a hand-kept order of the slow modules. Measured once each on a
# shared, busy machine (2026-12-07): worksteal 1220 s for 3119 s of tests, loadscope 968 s for
# 2492 s (the load had eased): the same 0.39 s of wall time per second of tests.
XDIST := -n 3 --dist worksteal

pytest: install browser-deps redis-deps
	$(BIN)/pytest $(XDIST)

test: lint typecheck pytest

# The inner loop, under a minute: unit and in-process tests only, no lint or typecheck. Leaves
# out the e2e tests (a redis-server, servers or workers of their own) and the slow ones
# (Hypothesis properties); tests/conftest.py marks them from what they use. These keep the CPU
# busy rather than wait: one worker a core (-n auto). 397 tests, 47 s on the 2 shared cores
# with a load of 3-4 (2026-12-07); 67 s with -n 3.
.PHONY: test-fast
test-fast: install
	$(BIN)/pytest -n auto --dist worksteal -m "not e2e and not slow"

# The fault test of `make test` (20 kills of the training worker), 200 times over.
faults: install
	SGD_FAULT_ROUNDS=200 $(BIN)/pytest -s tests/test_faults.py -k random_moments

# Redis mode under random faults for CHAOS_MINUTES (two replicas, two workers, a proxy that cuts
# connections; kills, pauses, Redis restarts and hangs), then a check that every 202 ended as
# promised: README, "Scaling out". It ends within CHAOS_MINUTES + 3 minutes whatever happens.
CHAOS_MINUTES ?= 3
chaos: install redis-deps
	$(BIN)/python -m tests.chaos --minutes $(CHAOS_MINUTES)

bench: install
	$(BIN)/python bench/run.py

# .ci/constraints.txt, which the Dockerfile installs with: what a clean install of the runtime
# dependencies resolves to today (torch from TORCH_INDEX_URL, alone, as the Dockerfile does).
constraints:
	rm -rf $(VENV)-lock && $(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/pip install --quiet --disable-pip-version-check --no-deps $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL)) '$(TORCH)'
	$(VENV)-lock/bin/pip install --quiet --disable-pip-version-check .
	{ sed -n '1,4p' .ci/constraints.txt; $(VENV)-lock/bin/pip freeze --exclude-editable | grep -v '^sgd-service' | sed 's/^torch==\([^+]*\)+.*/torch==\1/'; } > .ci/constraints.txt.new
	mv .ci/constraints.txt.new .ci/constraints.txt && rm -rf $(VENV)-lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis artifacts
