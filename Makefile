# `make run` and `make test` work on a fresh machine with Python 3.11, gcc and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup run test bench clean install-service

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

# llama-cpp-python compiles from source the first time (~10 min on 2 cores); pip caches the wheel.
# The bench extra too: tests/test_benchmarks.py runs `python -m benchmarks --quick` end to end.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -e '.[test,bench]'
	touch $@

setup: $(STAMP)

run: setup
	$(VENV)/bin/edison serve

# The browser tests drive Debian's Chromium; the script installs it when missing (as root).
test: setup
	sh scripts/install-browser.sh
	sh deploy/install-systemd-analyze.sh
	$(VENV)/bin/pytest

# A systemd unit for this checkout (user `edison`, Type=notify, watchdog, hardening); run as root.
install-service: setup
	sh deploy/install-service.sh

# Stop latency per phase, side by side with the alternatives; BENCH_ARGS=--quick for a short run.
bench: setup
	$(VENV)/bin/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
