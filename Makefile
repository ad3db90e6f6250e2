# The README's commands. `make run` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format e2e hadolint lock clean

$(STAMP): requirements-dev.lock requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

## Run the whole system on this machine: SQLite, a filesystem broker, API on :8000.
run: $(STAMP)
	$(BIN)/taskdock dev

## The test suite with the coverage gate (PostgreSQL, Redis and RabbitMQ on localhost).
test: $(STAMP)
	$(BIN)/python -m pytest -m "not docker" --cov --cov-report=term --cov-fail-under=80

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## Re-pin the dependencies after editing pyproject.toml.
lock: $(STAMP)
	$(BIN)/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links -o requirements.lock pyproject.toml
	$(BIN)/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links --extra dev -o requirements-dev.lock pyproject.toml

clean:
	rm -rf $(VENV) .taskdock .coverage .coverage.* .pytest_cache .mypy_cache .ruff_cache
