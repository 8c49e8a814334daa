# Two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.13.0

.PHONY: demo test lint typecheck unit slow clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, so the project's torch range resolves to it instead of a CUDA build.
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/miprun prune --num-blocks 3 --out out/demo --overwrite --eval

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy src/miprun

# the suite runs on WORKERS processes (pytest-xdist), sharing the cores; WORKERS=0 runs it in this one
WORKERS ?= 2

test: lint typecheck
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist worksteal --durations=20  # and the 20 slowest tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not integration"

clean-venv:
	rm -rf $(VENV)
