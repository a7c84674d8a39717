# ctxflow — the two set-up commands are `make demo` and `make test`; both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test unit integration lint demo bench bench-quality soak up down clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest tests

unit: install
	$(BIN)/python -m pytest tests/unit

integration: install
	$(BIN)/python -m pytest tests/integration tests/faults

demo: install
	$(BIN)/ctxflow demo

bench: install
	$(BIN)/ctxflow bench

# Every eviction strategy at 50%, 25% and 10% budgets over generated sessions: quality-results.json
bench-quality: install
	$(BIN)/ctxflow bench-quality

# 30 minutes at 1,500 events/s unless told otherwise: make soak SOAK_MINUTES=5 SOAK_RATE=1000
SOAK_MINUTES ?= 30
SOAK_RATE ?= 1500
soak: install
	$(BIN)/ctxflow soak --minutes $(SOAK_MINUTES) --rate $(SOAK_RATE)

up: install
	$(BIN)/ctxflow up

down: install
	$(BIN)/ctxflow down

clean:
	rm -rf .ctxflow .pytest_cache .ruff_cache bench-results.json soak-results.json quality-results.json
