# The two commands of the README: `make demo` and `make test`. Both create the environment first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench leaderboard clean-venv

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

## Build mini8 if it is not cached, run every registered method on it, write and print the leaderboard.
demo: $(BIN)/.installed
	$(BIN)/mergebench demo --suite mini8

## Run the test suite (micro configuration; minutes on 2 cores).
test: $(BIN)/.installed
	$(BIN)/pytest -q

## pytest-benchmark measurements (speed, memory), run on demand; saved under .benchmarks/.
bench: $(BIN)/.installed
	$(BIN)/pytest -q tests/benchmarks --benchmark-only --benchmark-autosave

leaderboard: $(BIN)/.installed
	$(BIN)/mergebench leaderboard --suite mini8 --write

clean-venv:
	rm -rf $(VENV)
