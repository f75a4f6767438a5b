# `make test` and `make demo` each set up .venv on first use (tools/bootstrap.sh), then run.
# `make demo` installs only the demo extra (no test frameworks), so a fresh machine gets there fast.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.grng-installed
DEMO_STAMP := $(VENV)/.grng-demo-installed
INPUTS := pyproject.toml setup.py constraints.txt tools/bootstrap.sh $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)

.PHONY: test test-fast demo bench clean

$(STAMP): $(INPUTS)
	bash tools/bootstrap.sh
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow" tests

# The demo's set-up skips the C++ extension build (about 140 s on 2 cores, half the demo's
# 300 s budget) unless GRNG_EXT=1: grng then runs its reference (torch ops) backend, and the
# demo runs with GRNG_EXT_COMPILE=0 so that nothing compiles it on first use either (an
# extension that `make test` built is still used).
$(DEMO_STAMP): $(INPUTS)
	GRNG_EXTRAS=demo GRNG_EXT=$${GRNG_EXT:-0} bash tools/bootstrap.sh
	touch $@

demo: $(DEMO_STAMP)
	GRNG_EXT_COMPILE=$${GRNG_EXT:-0} $(PY) -m grng.demo

bench: $(STAMP)
	$(PY) bench/kernels.py

clean:
	rm -rf $(VENV) build *.egg-info grng/*.so grng/ops/*.so
