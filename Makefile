# The two commands a new machine needs: `make demo` and `make test`. Both set up .venv themselves.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test bench clean

venv:
	@scripts/bootstrap.sh

demo: venv
	$(PY) scripts/demo.py

test: venv
	$(PY) -m pytest

bench: venv
	$(PY) bench/storage.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
