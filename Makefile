# The whole set-up: `make demo` and `make test` each install first (idempotent, fast when done).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Test files spread over one process per core (a file stays in one process, so its module fixtures run once).
PYTEST_ARGS ?= -n auto --dist loadfile

.PHONY: install demo demo-pills test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,tune,postgres,retrieval,export,serve,audit,augment,albumentations]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/vistrain demo --out demo_data

demo-pills: install
	$(VENV)/bin/vistrain demo --scenario pills --out demo_data/pills

test: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(PY) benchmarks/bench_loader.py

clean:
	rm -rf $(VENV) demo_data experiments logs .pytest_cache
