# keel: `make run` starts every service on SQLite; `make test` lints and runs the whole suite.
# Both install what they need: uv (into .tools/ if it is not on PATH), then the locked dependencies.

SHELL := /bin/bash
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
RUN := $(UV) run --frozen

.PHONY: install run test lint format bench clean

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet uv

install: $(if $(filter .tools/bin/uv,$(UV)),.tools/bin/uv)
	$(UV) sync --frozen --quiet

run: install
	$(RUN) keel run

lint: install
	$(RUN) ruff check src tests bench loadtest
	$(RUN) ruff format --check src tests bench loadtest
	$(RUN) mypy

format: install
	$(RUN) ruff check --fix src tests bench loadtest
	$(RUN) ruff format src tests bench loadtest

test: lint
	$(RUN) pytest $(PYTEST_ARGS)

# Every service's bench in turn, each writing bench/results/<service>.md and .png; one that fails
# does not keep the others from running, and the target fails at the end. BENCH_ARGS go to each
# (`make bench BENCH_SERVICES=firehose BENCH_ARGS="-s redis-drain-2m"` for one row).
# wrk drives the load; Debian has it. Root installs it directly, anyone else through sudo.
BENCH_SERVICES ?= ledger firehose inventory

bench: install
	@command -v wrk >/dev/null || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq wrk; \
	} || { echo "make bench needs wrk: apt-get install wrk" >&2; exit 1; }
	@failed=""; for service in $(BENCH_SERVICES); do \
		$(RUN) keel bench $$service $(BENCH_ARGS) || failed="$$failed $$service"; \
	done; \
	[ -z "$$failed" ] || { echo "make bench: failed:$$failed" >&2; exit 1; }

clean:
	rm -rf .venv .tools data .pytest_cache .mypy_cache .ruff_cache
