# Folio: `make run` starts the local stack on the bundled model (`make run ARGS="--engines 2"`); `make test` runs the test suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install model protos clean

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP) protos

protos: $(STAMP)
	@if [ -f protos/generate.py ]; then $(PY) protos/generate.py; fi

model: install
	$(PY) -m folio prepare-model

run: model
	$(PY) -m folio up $(ARGS)

test: model
	$(PY) -m pytest -q --timeout=900 --durations=30 tests

clean:
	rm -rf $(VENV)
