# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv in the repo root when it is missing and install the project into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all venv clean-venv

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/qwen-vl demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -x tests

clean-venv:
	rm -rf $(VENV)
