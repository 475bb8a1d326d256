# Everything installs into .venv at the project root; all state (Prefect, matplotlib cache) stays in .ctcompare/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PREFECT_HOME ?= $(CURDIR)/.ctcompare/prefect
export MPLCONFIGDIR ?= $(CURDIR)/.ctcompare/matplotlib
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install orthanc demo test lint bench bench-ingest server deploy worker clean mutation

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

$(VENV)/.mutation-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,mutation]'
	touch $@

# Offline the pretrained arms are skipped (no weights file), which ctcompare reports as a partial result (exit 3).
demo: install
	$(BIN)/ctcompare demo --out demo || [ $$? -eq 3 ]

# The PACS tests run a real Orthanc (Debian packages): installed here when missing and run as root, as CI does.
orthanc:
	@if command -v Orthanc >/dev/null && ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null; \
	else echo "orthanc: not installed and not root; the PACS tests (tests/pacs) will be skipped"; fi

# Parallel: one pytest-xdist worker per core plus one (many tests wait on servers and subprocesses; the extra worker
# uses that time), each test process on one torch thread; whole files per worker so that each file's module fixtures
# (cohorts, trained tiny runs) are built once; the heaviest files start first (tests/conftest.py).
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
test: install orthanc
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: install  ## ruff: pyflakes, pycodestyle, import order (settings: pyproject.toml [tool.ruff])
	$(BIN)/ruff check .

bench: install
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/cost.py
	$(BIN)/python benchmarks/train.py

bench-ingest: install  ## ingest phases and ratios vs the plain loop (PATIENTS=150 -> 1,500 files)
	$(BIN)/python benchmarks/ingest.py --patients $(or $(PATIENTS),150)

clean:
	rm -rf .ctcompare demo

# Operating it the Prefect way (docs/operations.md): three terminals, in this order. State: .ctcompare/prefect.
server: install  ## Prefect server (API + UI) on :4200 + report server (out/reports) on :8765; Ctrl-C stops both
	scripts/prefect_local.sh server

deploy: install  ## process work pool ctcompare-local + every deployment in prefect.yaml
	scripts/prefect_local.sh deploy

worker: install  ## a process worker on ctcompare-local, one flow run at a time (CTCOMPARE_WORKER_LIMIT)
	scripts/prefect_local.sh worker

# Mutation testing (docs/mutation-testing.md; not part of CI, long): every scoped module, or MODULES="ingest.preprocess evaluation.statistics";
# MUTATION_SAMPLE=N checks a seeded sample of N mutants per module instead of all. Prints the score per module.
mutation: $(VENV)/.mutation-installed
	PYTHON=$(BIN)/python MUTATION_SAMPLE=$(MUTATION_SAMPLE) scripts/mutation.sh $(MODULES)
