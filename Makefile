# Targets CI runs: check (lint, format, types) and test. Threads: one heavy process at a time.
PY ?= python
.PHONY: check test test-slow fmt bench

check:
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples
	$(PY) -m mypy

fmt:
	$(PY) -m ruff format src tests benchmarks examples
	$(PY) -m ruff check --fix src tests benchmarks examples

test:
	$(PY) -m pytest -q

test-slow:
	$(PY) -m pytest -q -m slow
