# Quick start: `make serve` and `make test`. Both build .venv from scratch when it is missing or stale.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= dev,training,serving

.PHONY: install test serve clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache

# The embedded demo model; override with `make serve MODEL=path/or/hub-id`.
MODEL ?= qformer/demo/bundle
HOST  ?= 127.0.0.1
PORT  ?= 8000

serve: $(STAMP)
	$(VENV)/bin/qbridge serve --model $(MODEL) --host $(HOST) --port $(PORT)
