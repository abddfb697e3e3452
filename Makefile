# Every target bootstraps its own virtual environment, so a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick lint typecheck bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ckptwriter train --config examples/quick_start.yaml

# Two workers, one test file each at a time (tests of a file share fixtures and servers).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m 'not slow'

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) outputs .pytest_cache .mypy_cache .ruff_cache
