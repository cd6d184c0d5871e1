# The two set-up commands of README.md. Both install what is missing: Debian packages
# (apt-get, as root or through sudo) and Python packages into .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEB_PACKAGES := softhsm2 opensc python3-venv systemd chromium curl redis-server postgresql libnss3-tools p11-kit p11-kit-modules
BENCH_PACKAGES := wrk
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint bench system-deps venv clean

system-deps:
	@missing=""; for p in $(DEB_PACKAGES) $(EXTRA_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check kms hsm_config tests bench deploy
	$(BIN)/ruff format --check kms hsm_config tests bench deploy
	$(BIN)/mypy

test: system-deps venv lint
	$(BIN)/pytest

demo: system-deps venv
	$(BIN)/python deploy/demo.py --data-dir demo-data --bind 127.0.0.1:8200

bench: venv
	$(MAKE) system-deps EXTRA_PACKAGES="$(BENCH_PACKAGES)"
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python bench/run.py
	$(BIN)/python bench/audit_append.py
	$(BIN)/python bench/seals.py
	$(BIN)/python bench/hsm_calls.py
	$(BIN)/python bench/sdk_cache.py
	$(BIN)/python bench/xks.py
	$(BIN)/python bench/load.py
	$(BIN)/python bench/profile_decrypt.py

clean:
	rm -rf $(VENV) demo-data .pytest_cache .mypy_cache .ruff_cache
