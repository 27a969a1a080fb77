# fnbox: the two commands a user needs are `make run` and `make test`.
# Both create .venv/ from the machine's real python3 interpreter and install the pinned requirements.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
DEVSTAMP := $(VENV)/.installed-dev

.PHONY: run test lint bench setup clean

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
	$(VENV)/bin/gunicorn -c ops/gunicorn.conf.py

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
