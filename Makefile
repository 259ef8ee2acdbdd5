# Entry points a newcomer types: install, run, test, lint, fmt, bench.
SHELL := /bin/bash
# The site runs Django 6.0, which needs Python >= 3.12: the newest Python this machine has (PATH or
# pyenv), unless PYTHON names one. On Python 3.11 it installs Django 5.2 LTS instead (jobs supports both).
PYTHON ?= $(shell devtools/pick-python)
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
REQS := $(wildcard requirements/*.txt)
STAMP := $(VENV)/.installed-$(shell cat $(REQS) | sha1sum | cut -c1-12)-$(notdir $(PYTHON))
# The reusable app's second leg: Django 5.2 LTS on Python 3.11 (`make test-lts`, run by .ci/run).
LTS_PYTHON ?= $(shell command -v python3.11 2>/dev/null || echo python3)
LTS_VENV ?= .venv-lts
LTS_STAMP := $(LTS_VENV)/.installed-$(shell cat $(REQS) | sha1sum | cut -c1-12)
# The suite runs in this many processes (pytest-xdist, a test file each at a time; 0: in this one).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile
# What `jobs` is tested with on both legs: its unit tests and its real-worker tests.
APP_TESTS := tests/jobs tests/integration/test_reusable_app.py tests/integration/test_dead_letters.py \
	tests/integration/test_worker.py tests/integration/test_beat.py tests/integration/test_django_tasks.py

.PHONY: install run screenshots test test-fast test-lts lint fmt bench bench-quick chaos cluster check clean help

help:
	@echo "make install  create .venv and install pinned requirements (idempotent)"
	@echo "make run      install, migrate, then web, worker, beat and Flower together (Ctrl-C stops all)"
	@echo "make test     install, then the whole suite with coverage (a private Redis is started)"
	@echo "make lint     ruff check, format check, the import contract (import-linter) and types (mypy)"
	@echo "make fmt      ruff fix and format"
	@echo "make bench    run the benchmarks and print one table"
	@echo "make chaos    the kill-chaos run, full form (PostgreSQL needed): 20 000 jobs, 36 SIGKILLs, one table"
	@echo "make cluster  several hosts in network namespaces (root, PostgreSQL): partitions and the like"

install: $(STAMP)

$(STAMP): $(REQS)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else f"make install: {sys.executable} is Python {sys.version.split()[0]}; 3.11 or newer is needed (PYTHON=...)")'
	@if [ -x $(BIN)/python ] && [ "$$($(BIN)/python -c 'import sys; print(sys.version_info[:2])')" != "$$($(PYTHON) -c 'import sys; print(sys.version_info[:2])')" ]; then \
		echo "make install: $(VENV) was made with another Python; making it again"; \
		rm -rf $(VENV); \
	fi
	@if [ ! -x $(BIN)/python ]; then \
		$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
			echo "python3 -m venv failed: installing Debian's python3-venv"; \
			rm -rf $(VENV); \
			$$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q python3-venv && $(PYTHON) -m venv $(VENV); \
		}; \
	fi
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	@version=$$($(BIN)/python -c 'import sys; print(sys.version.split()[0])'); \
	if $(BIN)/python -c 'import sys; sys.exit(sys.version_info >= (3, 12))'; then \
		echo "make install: Python $$version ($(PYTHON)); Django 6.0 needs 3.12+, so Django 5.2 LTS here"; \
		devtools/lts-requirements var/requirements-lts && reqs=var/requirements-lts/dev.txt; \
	else \
		echo "make install: Python $$version ($(PYTHON)), Django 6.0"; reqs=requirements/dev.txt; \
	fi; \
	echo "$(BIN)/python -m pip install -r $$reqs"; \
	$(BIN)/python -m pip install -q --disable-pip-version-check -r $$reqs
	@mkdir -p var/media var/tmp
	@rm -f $(VENV)/.installed-*
	@touch $@

run: install
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py setup_schedules
	FORCE_COLOR=1 $(BIN)/python -m devtools.localredis -- $(BIN)/python -m devtools.procfile start -f Procfile

# Beside the suite run the fault suite (tests/faults, its own test database) and the benchmarks'
# quick mode (so they cannot rot; their figures mean nothing here): all of them mostly wait on the
# processes they start, and together they stay well within 15 minutes on 2 cores. Their output
# follows the suite's; any of them failing fails make test (a fault run that selects nothing is fine).
test: install
	@echo "--- the test suite; beside it the fault suite (var/faults.log) and the benchmarks' quick mode (var/bench-quick.log) ---"
	@$(BIN)/python -m bench --quick > var/bench-quick.log 2>&1 & bench=$$!; \
	TEST_DATABASE_SUFFIX=_faults $(BIN)/python -m pytest -m faults -p no:cacheprovider $(PYTEST_ARGS) \
		> var/faults.log 2>&1 & faults=$$!; \
	$(BIN)/python -m pytest -m "not faults and not cluster" $(XDIST) --cov --cov-report=term --cov-fail-under=90 $(PYTEST_ARGS); tests=$$?; \
	wait $$faults; faulted=$$?; [ $$faulted -eq 5 ] && faulted=0; \
	wait $$bench; benched=$$?; \
	echo "--- the fault suite ---"; cat var/faults.log; \
	echo "--- benchmarks, quick mode ---"; cat var/bench-quick.log; \
	if [ $$faulted -ne 0 ]; then echo "the fault suite failed (exit $$faulted)"; fi; \
	if [ $$benched -ne 0 ]; then echo "the benchmarks' quick mode failed (exit $$benched)"; fi; \
	[ $$tests -eq 0 ] && [ $$faulted -eq 0 ] && [ $$benched -eq 0 ]

# Django 5.2 LTS on Python 3.11: the same pinned requirements but those two pins, in a venv of its own.
test-lts: $(LTS_STAMP)
	TEST_DATABASE_SUFFIX=_lts $(LTS_VENV)/bin/python -m pytest -p no:cacheprovider $(XDIST) $(APP_TESTS) $(PYTEST_ARGS)

$(LTS_STAMP): $(REQS)
	@echo "make test-lts: Django 5.2 LTS on Python $$($(LTS_PYTHON) -c 'import sys; print(sys.version.split()[0])') ($(LTS_PYTHON))"
	@rm -rf $(LTS_VENV)
	$(LTS_PYTHON) -m venv $(LTS_VENV)
	@mkdir -p var/media var/tmp
	devtools/lts-requirements var/requirements-lts
	$(LTS_VENV)/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(LTS_VENV)/bin/python -m pip install -q --disable-pip-version-check -r var/requirements-lts/dev.txt
	@touch $@

# The README's screenshots, of the site as `make run` starts it with real work flowing (by hand).
screenshots: install browser
	$(BIN)/python -m devtools.screenshots

test-fast: install
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy --cache-dir .mypy_cache/lint  # its own cache: an ad-hoc mypy run on other files cannot leak into it

fmt: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

check: install
	$(BIN)/python manage.py check

bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-quick: install
	$(BIN)/python -m bench --quick $(BENCH_ARGS)

# The kill-chaos run, full form (tests/chaos/run.py; its short form runs in `make test`): 20 000 jobs
# through two workers while 36 of their processes are SIGKILLed (4 of them whole workers, each then
# replaced), the broker Redis restarts empty once, the database refuses connections for 6 s once and
# a burst grows a backlog; then the table (jobs, kills, lost, started twice without a kill, re-runs
# per kill, slowest reclaim; docs/reliability.md). Its own database, Redis servers and workers, all
# removed at the end. About 20 minutes on 2 cores; CHAOS_ARGS=... changes it (--help lists them).
CHAOS_ARGS ?= --jobs 20000 --kills 36 --worker-kills 4 --refuse-seconds 6
chaos: install
	$(BIN)/python -m tests.chaos.run $(CHAOS_ARGS)

# Several hosts on this machine (network namespaces: root needed) against PostgreSQL: partitions,
# a black-holed database, skewed clocks (tests/cluster). Not part of `make test` (its time budget).
CLUSTER_DATABASE_URL ?= $(or $(DATABASE_URL),postgres://postgres@127.0.0.1:5432/postgres)
cluster: install
	rm -f var/cluster-figures.jsonl
	DATABASE_URL=$(CLUSTER_DATABASE_URL) TEST_DATABASE_SUFFIX=_cluster $(BIN)/python -m pytest -m cluster -p no:cacheprovider tests/cluster $(PYTEST_ARGS); \
	status=$$?; cat var/cluster-figures.jsonl 2>/dev/null; exit $$status

clean:
	rm -rf $(VENV) $(LTS_VENV) var/tmp .pytest_cache .coverage .coverage.* htmlcov

# --- Browser for the thumbnails page test ---------------------------------------------------
# Debian's chromium, installed when missing and apt-get is usable (root or password-less sudo).
# Never fails by itself: without a browser the browser tests skip and say why (and .ci/run, which
# allows no such skip, then fails).
.PHONY: browser
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
browser:
	@if [ -x /usr/bin/chromium ]; then \
		:; \
	elif command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
		echo "installing Debian's chromium for the browser test"; \
		$(SUDO) apt-get install -y -q chromium >/dev/null 2>&1 \
			|| { $(SUDO) apt-get update -q >/dev/null 2>&1 && $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1; } \
			|| echo "could not install chromium: the browser test will be skipped"; \
	else \
		echo "no /usr/bin/chromium and apt-get is not usable: the browser test will be skipped"; \
	fi

test: browser
