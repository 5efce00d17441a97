# The two commands a new machine needs: `make demo` and `make test`. Both set up .venv themselves.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv tools bench-tools demo lint test bench clean

venv:
	@scripts/bootstrap.sh

# helm, kubectl and the linters the chart/container tests run (under .tools/)
tools:
	@scripts/test-tools.sh

demo: venv
	$(PY) scripts/demo.py

# ruff and mypy, configured in pyproject.toml; `make test` runs it before the tests.
# mypy runs even when ruff finds something, so one run reports both.
lint: venv
	$(PY) -m ruff check trainer tests bench scripts; ruff=$$?; $(PY) -m mypy && exit $$ruff

# Two xdist workers, each taking whole test modules (module fixtures are built once), the long modules first:
# tests/conftest.py orders them, and --no-loadscope-reorder keeps that order (xdist would otherwise hand out the
# modules with most tests first, leaving one-test modules such as the 5-minute learning test for the end).
# On CI's 2 cores this keeps both busy. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2

test: venv tools lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# nginx for the S3 rows of the loader bench (bench/_static_s3.py); Debian, as root
bench-tools:
	@scripts/bench-tools.sh

bench: venv bench-tools
	$(PY) bench/storage.py
	$(PY) bench/dataloader.py

clean:
	rm -rf $(VENV) .tools demo-output .pytest_cache .mypy_cache .ruff_cache
