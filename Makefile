# TORCH_SPEC picks the PyTorch build: CI and CPU machines use `torch==2.13.0` (the CPU build);
# GPU users keep the default or pass their own, e.g. `make test TORCH_SPEC="torch==2.11.0"`.
TORCH_SPEC ?= torch
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: venv quickstart test clean

$(VENV)/.installed: setup.py constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

venv: $(VENV)/.installed

quickstart: venv
	$(PY) -m dfm_diffusers.quickstart

test: venv
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs
