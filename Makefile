# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test check fast lint typecheck unit bench soak clean man

# Both distributions, editable, in one venv: netserver (the root pyproject.toml, with the
# developer tools) and leafmail (packages/leafmail), whose dependency on netserver is
# the editable one installed beside it.
$(STAMP): pyproject.toml packages/leafmail/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' -e ./packages/leafmail
	touch $(STAMP)

# `make run`: leafmail serve in the foreground, its spool in ./spool. The README's next
# commands reach it from a second shell after the export line it prints (a test runs them).
RUN_SPOOL ?= $(CURDIR)/spool
RUN_LISTEN ?= 127.0.0.1:2525
RUN_FLAGS ?=
run: $(STAMP)
	@# As root the workers run as the leafmail user (leafmail.privsep); make it once.
	@if [ "$$(id -u)" = 0 ] && ! id leafmail >/dev/null 2>&1; then \
	  useradd --system --home-dir /var/spool/leafmail --shell /usr/sbin/nologin leafmail; fi
	@echo 'make run: in a second shell, in this checkout:'
	@echo '  export PATH="$$PWD/.venv/bin:$$PATH" LEAFMAIL_SPOOL="$$PWD/spool"'
	$(BIN)/leafmail serve --listen $(RUN_LISTEN) --spool $(RUN_SPOOL) --hostname localhost $(RUN_FLAGS)

# leafmail(8) and netserver(8), generated from the argparse definitions by argparse-manpage
# (man/*.include adds ENVIRONMENT, FILES, EXIT STATUS ...); the pages are committed and
# installed with the package (share/man/man8); a test checks they are up to date.
MANDIR ?= man
MANDATE := $(shell git log -1 --format=%ct 2>/dev/null || date +%s)
man: $(STAMP)
	SOURCE_DATE_EPOCH=$(MANDATE) $(BIN)/argparse-manpage --module leafmail.cli \
	  --function build_parser --prog leafmail --manual-section 8 \
	  --manual-title "System Manager's Manual" --project-name leafmail \
	  --description "a durable store-and-forward mail spooler" \
	  --include man/leafmail.include --output $(MANDIR)/leafmail.8
	SOURCE_DATE_EPOCH=$(MANDATE) $(BIN)/argparse-manpage --module netserver.cli \
	  --function build_parser --prog netserver --manual-section 8 \
	  --manual-title "System Manager's Manual" --project-name netserver \
	  --description "write a TCP server as a function of stdin and stdout" \
	  --include man/netserver.include --output $(MANDIR)/netserver.8

lint: $(STAMP)
	$(BIN)/ruff check src tests examples bench fuzz
	$(BIN)/ruff format --check src tests examples bench fuzz

typecheck: $(STAMP)
	$(BIN)/mypy

# The whole suite in two parallel worker processes (pytest-xdist; what CI's 2 cores give,
# and the count it is checked with: more workers on a loaded machine made two timing-
# sensitive tests of test_leaks.py fail once):
# most tests wait on a daemon, a command or a timeout rather than compute. --dist loadfile
# keeps each test file in one worker (module fixtures, helpers' users and shared paths);
# TEST_WORKERS=0 runs it in this process, one test at a time.
TEST_WORKERS ?= 2
unit: $(STAMP)
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

# The fast layer: tests that stay in this process (no subprocess, no daemon, no fork);
# tests/conftest.py marks every other test `slow` by rule and fails a fast test that
# starts a process. `make check` is the one to run before each commit (under a minute).
fast: $(STAMP)
	$(BIN)/pytest -q -m fast

check: lint typecheck fast

test: lint typecheck unit

# Benchmarks against the peers (tcpserver, bare asyncio/uvloop, Postfix, aiosmtpd, and
# postqueue for the queue listing); they install ucspi-tcp and postfix with apt-get when
# missing. Results: bench/RESULTS.md.
bench: $(STAMP)
	$(BIN)/python -m bench
	$(BIN)/python -m bench.smtp_bench
	$(BIN)/python -m bench.relay_bench
	$(BIN)/python -m bench.queue_bench --results

# The reliability suite (tests/reliability/) at full size: crash, disk-full, smarthost
# faults, attacks, fuzzing and load; `make test` runs its short form. The figures go to
# bench/reliability.jsonl and into the tables of bench/RELIABILITY.md (written even when a
# test fails, so the failure's figures are kept; the exit status is pytest's).
FIGURES := $(CURDIR)/bench/reliability.jsonl
soak: $(STAMP)
	rm -f $(FIGURES)
	SOAK=1 RELIABILITY_RECORD=$(FIGURES) $(BIN)/pytest -q -p no:cacheprovider \
	  --timeout 3600 tests/reliability; status=$$?; \
	  $(BIN)/python -m bench.reliability_report $(FIGURES) bench/RELIABILITY.md && exit $$status

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
