# The two commands of the README: `make run` (dev stack + worker) and `make test` (everything).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint unit bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/fileserver dev

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy fileserver

unit: setup
	$(BIN)/python -m pytest tests/unit -q -p no:cacheprovider

test: lint
	$(BIN)/python -m tests.servers.kafka --fetch
	$(BIN)/python -m tests.servers.toxiproxy --fetch
	$(BIN)/python -m pytest -p no:cacheprovider -ra --durations=15

bench: setup
	$(BIN)/python -m bench --preset deployment

clean:
	rm -rf $(VENV) build dist *.egg-info
