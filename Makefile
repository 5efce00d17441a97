# The two commands a new machine needs: `make demo` and `make test`. Both set up .venv themselves.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv tools demo test bench clean

venv:
	@scripts/bootstrap.sh

# helm, kubectl and the linters the chart/container tests run (under .tools/)
tools:
	@scripts/test-tools.sh

demo: venv
	$(PY) scripts/demo.py

test: venv tools
	$(PY) -m pytest

bench: venv
	$(PY) bench/storage.py

clean:
	rm -rf $(VENV) .tools demo-output .pytest_cache
