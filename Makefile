# The README's commands. `make run` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PYTHON ?= python3
BASE_IMAGE ?= python:3.11.14-slim-bookworm
IMAGE ?= taskdock:local
VENV ?= .venv
BIN := $(VENV)/bin
# `make run` needs only the runtime lock; everything else (tests, lint, bench) the dev lock.
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed-dev
# `make run PORT=8001 HOST=0.0.0.0`; unset, TASKDOCK_API_PORT and TASKDOCK_API_HOST decide.
PORT ?=
HOST ?=

.PHONY: run test chaos chaos-peak lint format fuzz e2e hadolint k8s-check bench monitoring-check image base-image lock clean docs docs-build docs-gen

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	touch $@

$(RUNTIME): requirements.lock pyproject.toml $(VENV)/.created
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

$(STAMP): requirements-dev.lock requirements.lock pyproject.toml $(VENV)/.created
	$(BIN)/pip install --quiet -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@ $(RUNTIME)

## Run the whole system on this machine: SQLite, a filesystem broker, API on 127.0.0.1:8000.
run: $(RUNTIME)
	$(BIN)/taskdock dev $(if $(PORT),--port $(PORT)) $(if $(HOST),--host $(HOST))

## The test suite with the coverage gate (PostgreSQL, Redis and RabbitMQ on localhost).
test: $(STAMP)
	$(BIN)/python -m pytest -m "not docker and not fuzz and not chaos" --cov --cov-report=term --cov-fail-under=80

## Soak and chaos: steady load while faults are injected; lost and unexpected must be 0 (CHAOS_SECONDS, default 600).
chaos: $(STAMP)
	$(BIN)/python -m pytest tests/chaos -m chaos -v -p no:cacheprovider

## The same at a hundred submissions a second, without Idempotency-Keys (the group commit and
## the batched publish), with tasks of 0-10 ms: lost and unexpected must be 0.
chaos-peak: $(STAMP)
	CHAOS_RATE=100 CHAOS_SLEEP_MS=0-10 CHAOS_KEYS=0 CHAOS_NAME=chaos-peak \
		$(BIN)/python -m pytest tests/chaos -m chaos -v -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## The application image (no registry: `make base-image`, then BASE_IMAGE=taskdock/base-python:3.11-bookworm).
image:
	docker build -f docker/Dockerfile --target runtime --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(IMAGE) .

## Debian bookworm + Python 3.11 from this machine's Debian mirror (root, debootstrap); cached.
base-image:
	scripts/build-base-image.sh

## Lint the Dockerfiles (failure threshold warning, DL3057 on: see .hadolint.yaml).
hadolint: $(STAMP)
	$(BIN)/hadolint --config .hadolint.yaml docker/Dockerfile tests/e2e/images/*/Dockerfile

## schemathesis against the live API: every operation, hundreds of examples each, auth included.
fuzz: $(STAMP)
	$(BIN)/python -m pytest tests/api/test_schemathesis.py -m fuzz -v

## The Kubernetes overlays and the GitHub workflows: rendered, schema-checked, linted (tests/deploy).
k8s-check: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/deploy

## promtool: the Prometheus config, the alert rules and their unit tests.
monitoring-check:
	scripts/check-monitoring.sh

## Build the images, run the production compose stack on a real Docker engine (as root).
e2e: $(STAMP)
	$(BIN)/python -m pytest tests/e2e -m docker -v

## Benchmarks against their baselines, about 25 min (ARGS=--quick: about 5; see bench/README.md).
bench: $(STAMP)
	command -v wrk >/dev/null || apt-get install -y wrk || (apt-get update && apt-get install -y wrk)
	$(BIN)/python -m bench.run $(ARGS)

## The docs site on http://127.0.0.1:8001 (DOCS_PORT=…), rebuilt on every save of docs/.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve -a 127.0.0.1:$(or $(DOCS_PORT),8001)

## The docs site into site/ (git-ignored), strict: a broken link or a missing page fails.
docs-build: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

## Regenerate docs/reference/ (settings, CLI, HTTP API) from the code; tests/test_docs.py checks it.
docs-gen: $(STAMP)
	$(BIN)/python -m scripts.gen_docs

## Re-pin the dependencies after editing pyproject.toml.
lock: $(STAMP)
	$(BIN)/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links -o requirements.lock pyproject.toml
	$(BIN)/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links --extra dev -o requirements-dev.lock pyproject.toml

clean:
	rm -rf $(VENV) .taskdock site .coverage .coverage.* .pytest_cache .mypy_cache .ruff_cache
