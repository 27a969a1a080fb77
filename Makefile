# fnbox: the two commands a user needs are `make run` and `make test`.
# Both create .venv/ from the machine's real python3 interpreter and install the pinned requirements.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

# `make run` writes the server's pid here (Gunicorn removes it on exit), so `make stop` needs no `ps`.
PIDFILE ?= var/fnbox.pid

.PHONY: run stop wait test lint bench setup clean

$(VENV)/bin/python:
	# --copies is not used: the venv's python is a symlink to the real binary, never a version-manager shim.
	"$$($(PYTHON) -c 'import os,sys; print(os.path.realpath(sys.executable))')" -m venv $(VENV)

$(STAMP): requirements.txt pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -q -r requirements.txt wheel==0.45.1
	# The `fnbox` command (cli/main.py) as a console script in .venv/bin; the code stays in the repo.
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(DEVSTAMP): $(STAMP) requirements-dev.txt
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	touch $@

setup: $(STAMP)

run: $(STAMP)
	@mkdir -p $(dir $(PIDFILE))
	$(VENV)/bin/gunicorn -c ops/gunicorn.conf.py --pid $(PIDFILE)

# Returns once the server on $FNBOX_BIND answers /healthz (after `make run &`; a first run builds .venv/ first).
wait:
	@$(PYTHON) ops/wait_healthy.py

# Stops the server `make run` started (in this checkout), gracefully: calls in flight finish first.
stop:
	@if [ ! -s $(PIDFILE) ]; then echo "fnbox: not running (no $(PIDFILE))"; exit 0; fi; \
	pid=$$(cat $(PIDFILE)); \
	if ! kill -0 "$$pid" 2>/dev/null; then echo "fnbox: not running (stale $(PIDFILE))"; rm -f $(PIDFILE); exit 0; fi; \
	kill -TERM "$$pid"; \
	for i in $$(seq 600); do kill -0 "$$pid" 2>/dev/null || { echo "fnbox: stopped (pid $$pid)"; exit 0; }; sleep 0.1; done; \
	echo "fnbox: pid $$pid still running after 60 s" >&2; exit 1

test: $(DEVSTAMP)
	bash ops/setup-system.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest

lint: $(DEVSTAMP)
	$(VENV)/bin/ruff check .

bench: $(DEVSTAMP)
	bash ops/setup-system.sh
	$(VENV)/bin/python bench/run.py
	$(VENV)/bin/python bench/async_bench.py

clean:
	rm -rf $(VENV)
