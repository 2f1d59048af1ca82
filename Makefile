# flickd developer tasks. `make help` lists them.
PY ?= .venv/bin/python
PIP ?= .venv/bin/pip

.PHONY: help install test lint format bench services

help: ## Show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: ## Create .venv and install flickd (CPU torch first, so nothing pulls a CUDA build)
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'

test: ## Run the test suite (needs Postgres and Redis on 127.0.0.1)
	$(PY) -m pytest -q

lint: ## ruff lint + format check, mypy, the layer contracts
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	.venv/bin/lint-imports

format: ## Apply ruff fixes and formatting
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

services: ## Start local Postgres and Redis if they are not running
	bash .ci/services
