# Two commands do all the set-up on a fresh machine (Python >= 3.10):
#   make bench   - create .venv, install sparsert[test], run `sparsert bench configs/ci.yaml`
#   make test    - create .venv, install sparsert with its test extras, run the test suite
PYTHON ?= python3
VENV := .venv
CONFIG ?= configs/ci.yaml

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

.PHONY: bench test clean
bench: $(VENV)/.installed
	$(VENV)/bin/sparsert bench $(CONFIG)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) results/local
