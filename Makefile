# Every target builds its own virtual environment from setup.cfg; nothing else is assumed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Two stamps: `make run` installs only what running needs; test, lint and bench add the
# test extras (pytest, SDKs, linters) on top.
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
# Extra arguments for `sidecar demo` (make run ARGS="--listen 127.0.0.1:18080") or for the
# benchmark (make bench ARGS="--shared-state --limits")
ARGS :=

.PHONY: run test lint bench clean

# constraints.txt pins the whole environment (a freeze of a clean install), so a new
# release of a linter or library cannot turn CI red on its own. Refresh it on purpose.
$(RUN_STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e .
	touch $(RUN_STAMP)

$(TEST_STAMP): $(RUN_STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(TEST_STAMP)

run: $(RUN_STAMP)
	$(BIN)/sidecar demo $(ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check sidecar tests bench
	$(BIN)/mypy

# Two workers: the suite's waits (timeouts, drains, processes) overlap on a 2-core machine.
test: $(TEST_STAMP) lint
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

bench: $(TEST_STAMP)
	$(BIN)/python -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) .demo build *.egg-info
