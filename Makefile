# `make run` and `make test` work on a fresh machine with Python 3.11, gcc and make.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv

.PHONY: setup run test bench clean install-service

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

# llama-cpp-python compiles from source the first time (~7-10 min on 2 cores) into a wheelhouse
# keyed by its version and build flags; later installs on this machine take the wheel from there.
# Native CPU flags minus AMX: a -march=native build segfaults in ggml's AMX matmul on Xeons in VMs
# that report AMX (seen here, in llama-server too). pip's own wheel cache ignores CMAKE_ARGS, so it
# is bypassed for this one package and the wheelhouse directory name carries the flags instead.
# LLAMA_CPU=avx2 builds the portable path instead (no -march=native, no AVX-512): the test suite
# must pass on both, since the model's floating point (and so its greedy tokens) differs by CPU path.
LLAMA_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml | head -n 1)
LLAMA_CPU ?= native
ifeq ($(LLAMA_CPU),avx2)
LLAMA_TAG := avx2
export LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF
else ifeq ($(shell uname -m),x86_64)
LLAMA_FLAGS := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_TAG := native-noamx
export LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$(LLAMA_FLAGS)' -DCMAKE_CXX_FLAGS='$(LLAMA_FLAGS)'
else
LLAMA_TAG := native
export LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON
endif
WHEELHOUSE := $(HOME)/.cache/edison/wheels/llama-cpp-python-$(LLAMA_VERSION)-$(LLAMA_TAG)
# One stamp per build flavour: switching LLAMA_CPU reinstalls llama-cpp-python from its own wheel.
STAMP := $(VENV)/.installed-$(LLAMA_TAG)

# The bench extra too: tests/test_benchmarks.py runs `python -m benchmarks --quick` end to end.
$(STAMP): pyproject.toml setup.py edison/worker/abort.c | $(VENV)/bin/python
	ls $(WHEELHOUSE)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
	    CMAKE_ARGS="$$LLAMA_CMAKE_ARGS" $(VENV)/bin/pip wheel --no-deps --no-cache-dir \
	        --no-binary llama-cpp-python -w $(WHEELHOUSE) 'llama-cpp-python==$(LLAMA_VERSION)'
	$(VENV)/bin/pip install --force-reinstall --no-deps $(WHEELHOUSE)/llama_cpp_python-*.whl
	$(VENV)/bin/pip install --find-links $(WHEELHOUSE) -e '.[test,bench]'
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)
	$(VENV)/bin/edison fetch-models

run: setup
	$(VENV)/bin/edison serve

# The browser tests drive Debian's Chromium, the multi-box tests Debian's HAProxy; the scripts
# install them when missing (as root).
test: setup
	sh scripts/install-browser.sh
	sh scripts/install-haproxy.sh
	sh deploy/install-systemd-analyze.sh
	$(VENV)/bin/pytest

# A systemd unit for this checkout (user `edison`, Type=notify, watchdog, hardening); run as root.
install-service: setup
	sh deploy/install-service.sh

# Stop latency per phase, side by side with the alternatives; BENCH_ARGS=--quick for a short run.
bench: setup
	$(VENV)/bin/python -m benchmarks $(BENCH_ARGS)
	$(VENV)/bin/python -m benchmarks.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
