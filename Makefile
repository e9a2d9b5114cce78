# Two user-facing targets: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# constraints.txt pins torch==2.13.0, so no install here ever pulls a CUDA build of torch.
INSTALL := $(PIP) install -q -c constraints.txt

.PHONY: demo test lint format clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(INSTALL) --upgrade pip
	$(INSTALL) -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/batchlab train mnist1d-cnn --epochs 40 --target "val_acc>=0.9"

test: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(PY) -m pytest

format: $(VENV)/.installed
	$(VENV)/bin/ruff format src tests benchmarks examples
	$(VENV)/bin/ruff check --fix src tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
