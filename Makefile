# Two commands do all the set-up on a fresh machine (Python >= 3.10):
#   make bench   - create .venv, install sparsert[test,plot,ray] (ray: the Ray backend's CPU
#                  test), run `sparsert bench configs/ci.yaml`
#   make test    - create .venv, install sparsert with its test, plot and ray extras, then the
#                  torch extra (torch + onnx: ~3 min, ~4 GB, once) and Chromium from the OS
#                  packages where root may, so every optional extra's CPU tests run; run the suite
#   make figures - regenerate the README's figures (docs/img/) from the committed results
#   make wheel-check - a normal (non-editable) install of a built wheel into a fresh venv, used
#                  from another directory (CI; the shipped problems and configs come from the wheel)
PYTHON ?= python3
VENV := .venv
CONFIG ?= configs/ci.yaml

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test,plot,ray]'
	touch $@

.PHONY: bench test figures wheel-check clean
bench: $(VENV)/.installed
	$(VENV)/bin/sparsert bench $(CONFIG)

$(VENV)/.torch: $(VENV)/.installed
	$(VENV)/bin/python -m pip install -q -e '.[torch]'
	touch $@

test: $(VENV)/.installed $(VENV)/.torch
	scripts/ensure-chromium
	$(VENV)/bin/python -m pytest -q

figures: $(VENV)/.installed
	PYTHON=$(VENV)/bin/python scripts/figures

wheel-check: $(VENV)/.installed
	scripts/wheel-check $(VENV)/bin/python

clean:
	rm -rf $(VENV) results/local
