# `make test` and `make demo` each set up .venv on first use (tools/bootstrap.sh), then run.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.grng-installed
INPUTS := pyproject.toml setup.py constraints.txt tools/bootstrap.sh $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)

.PHONY: test test-fast demo bench clean

$(STAMP): $(INPUTS)
	bash tools/bootstrap.sh
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow" tests

demo: $(STAMP)
	$(PY) -m grng.demo

bench: $(STAMP)
	$(PY) bench/kernels.py

clean:
	rm -rf $(VENV) build *.egg-info grng/*.so
