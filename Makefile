# Two user-facing targets: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# constraints.txt pins torch==2.13.0, so no install here ever pulls a CUDA build of torch.
INSTALL := $(PIP) install -q -c constraints.txt
OUT ?= batchlab-out

.PHONY: demo test lint format clean

# The package, its runtime dependencies, pytest and ruff.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(INSTALL) --upgrade pip
	$(INSTALL) -e ".[dev]"
	touch $@

# The optional integrations the test suite also exercises (Lightning, HF Trainer, Ray).
$(VENV)/.installed-extras: $(VENV)/.installed
	$(INSTALL) -e ".[dev,lightning,transformers,ray]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/batchlab plan mnist1d-cnn --out $(OUT) --json $(OUT)/plan.json
	@echo "Open $(OUT)/report.html in a browser (rebuild it with: batchlab report $(OUT)/plan.json)."

test: $(VENV)/.installed-extras
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(PY) -m pytest

format: $(VENV)/.installed
	$(VENV)/bin/ruff format src tests benchmarks examples
	$(VENV)/bin/ruff check --fix src tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
