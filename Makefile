# fedgate: `make demo` runs the main job end to end; `make test` runs the suite.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system-deps demo test test-unit test-integration bench model clean

setup: $(STAMP)

# Services the integration tests start themselves (mosquitto, openssl), the headless
# browser of the status-page tests (chromium, chromium-driver), libpcap (scapy compiles
# live-capture BPF filters with it) and tcpdump (the live capture method); installed only when
# missing, so this is a no-op on a prepared box.
system-deps:
	@missing=""; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	ldconfig -p 2>/dev/null | grep -q 'libpcap\.so' || missing="$$missing libpcap0.8"; \
	command -v tcpdump >/dev/null 2>&1 || missing="$$missing tcpdump"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) \
	  || echo "warning: could not install$$missing; tests that need them will be skipped"; \
	fi

# the compiled hot path of gateway.flows is built by the editable install: its sources
# are prerequisites, so an edit to them rebuilds it
NATIVE_SRC := $(wildcard gateway/flows/*.pyx gateway/flows/*.pxd gateway/flows/*.pxi gateway/flows/*/*.pxi)

$(STAMP): pyproject.toml $(NATIVE_SRC)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@# torch first, the CPU wheel: a bare `torch` requirement would pull a multi-GB CUDA build
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: setup system-deps
	$(BIN)/python -m cloud_aggregator.demo

test: setup system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

test-integration: setup system-deps
	$(BIN)/python -m pytest -q tests/integration

bench: setup
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m benchmarks.run_all

# the bundled default model is package data (models/default links to it)
model: setup
	$(BIN)/fedgate model build-default --data data/iot23 --out gateway/model/default

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
