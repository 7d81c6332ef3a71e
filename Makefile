# Every target builds its own virtual environment from setup.cfg; nothing else is assumed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench clean

# constraints.txt pins the whole environment (a freeze of a clean install), so a new
# release of a linter or library cannot turn CI red on its own. Refresh it on purpose.
$(STAMP): setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/sidecar serve

lint: $(STAMP)
	$(BIN)/ruff check sidecar tests bench
	$(BIN)/mypy

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .demo build *.egg-info
