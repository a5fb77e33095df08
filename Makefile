# Overfly developer entry points. `make` (or `make help`) lists them.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# Configuration defaults every tool agrees on; set them in the environment to override.
export DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/overfly
export NATS_URL ?= nats://127.0.0.1:4222
export OVERFLY_COMMAND_ADDR ?= 127.0.0.1:8080
export OVERFLY_COMMAND_URL ?= http://127.0.0.1:8080

# Integration tests spawn their own nats-server, which Debian installs in /usr/sbin;
# cargo installed by rustup lives in ~/.cargo/bin.
export PATH := $(PATH):/usr/sbin:/sbin:$(HOME)/.cargo/bin

CARGO ?= cargo
# Extra arguments for the test runner, e.g. `make test ARGS=relay` (a test-name filter;
# with nextest also `ARGS='-E "test(relay)"'`).
ARGS ?=

.PHONY: help deps test lint fmt demo stop bench-append bench-read bench-schedule bench-sse toolchain

help: ## list the targets
	@echo "Overfly - make targets:"
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN { FS = ":.*## " } { printf "  %-14s %s\n", $$1, $$2 }'
	@echo "Settings: DATABASE_URL=$(DATABASE_URL) NATS_URL=$(NATS_URL)"

toolchain:
	@source ops/lib.sh && require_rust_toolchain

deps: ## make Postgres + NATS (JetStream) available and create the database
	@bash ops/deps.sh

test: toolchain deps ## run the whole test suite (nextest when installed)
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		echo "==> cargo nextest run --workspace --no-fail-fast $(ARGS)"; \
		$(CARGO) nextest run --workspace --no-fail-fast $(ARGS); \
	else \
		echo "==> cargo test --workspace --no-fail-fast $(ARGS) (install cargo-nextest for faster runs)"; \
		$(CARGO) test --workspace --no-fail-fast $(ARGS); \
	fi

lint: toolchain ## rustfmt check + clippy with warnings as errors
	@$(CARGO) fmt --version >/dev/null 2>&1 || { echo "error: rustfmt missing: rustup component add rustfmt" >&2; exit 1; }
	@$(CARGO) clippy --version >/dev/null 2>&1 || { echo "error: clippy missing: rustup component add clippy" >&2; exit 1; }
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: toolchain ## format the code in place
	$(CARGO) fmt --all

demo: toolchain deps ## build, start the command service and submit some demo jobs
	@bash ops/demo.sh

stop: ## stop what `make demo` started (Postgres and NATS keep running)
	@bash ops/stop.sh

bench-append: toolchain deps ## event-append benchmark (release build)
	$(CARGO) build --release -p overfly-command-service -p overfly-bench
	@if [ -x ops/bench/append ]; then ops/bench/append $(ARGS); \
	elif [ -f ops/bench/append ]; then bash ops/bench/append $(ARGS); \
	else echo "error: ops/bench/append not found" >&2; exit 1; fi

bench-read: toolchain deps ## read-side benchmark: catch-up, rebuild, queries, command->visible (release)
	$(CARGO) build --release -p overfly-command-service -p overfly-projector -p overfly-query-service -p overfly-bench
	@if [ -x ops/bench/read ]; then ops/bench/read $(ARGS); \
	elif [ -f ops/bench/read ]; then bash ops/bench/read $(ARGS); \
	else echo "error: ops/bench/read not found" >&2; exit 1; fi

bench-schedule: toolchain deps ## scheduling benchmark: jobs end to end on simulated GPUs vs. the bare write path (release)
	$(CARGO) build --release -p overfly-command-service -p overfly-executor -p overfly-bench
	@bash ops/bench/schedule $(ARGS)

bench-sse: toolchain deps ## SSE feed benchmark: 1,000 and 10,000 clients vs. a bare fan-out (release)
	$(CARGO) build --release -p overfly-command-service -p overfly-query-service -p overfly-bench
	@bash ops/bench/sse $(ARGS)
