# `make run` and `make test` set everything up on first use (idempotent).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Machines that keep wheels on disk (e.g. the pinned CPU torch) expose them here.
WHEELS := $(wildcard /opt/wheels)
PIP    := $(PY) -m pip install --disable-pip-version-check -q $(if $(WHEELS),--find-links $(WHEELS))

.PHONY: install install-dev run serve cluster cluster-stop test test-fast lint bench clean

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The library is installed in editable mode (`import lipsync` from anywhere, the `lipsync`
# command); its dependencies are the pinned requirements.txt.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	$(PIP) --no-deps -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PIP) -r requirements-dev.txt
	touch $@

run: install
	$(PY) app.py

# The production stack: nginx (Debian's package; installed here when missing and root) in front
# of gunicorn. README "Production".
serve: install
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || \
	  { test "$$(id -u)" = 0 && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx; } || \
	  { echo "make serve needs nginx: sudo apt-get install nginx" >&2; exit 1; }
	$(PY) -m lipsync.server.stack

# A local cluster in the background (README "Cluster"): redis-server and nginx (Debian's packages;
# installed here when missing and root), two web processes and two workers on PORT (3000).
cluster: install
	@missing=""; command -v redis-server >/dev/null 2>&1 || missing="redis-server"; \
	  command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || missing="$$missing nginx"; \
	  test -z "$$missing" || { test "$$(id -u)" = 0 && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; } || \
	  { echo "make cluster needs:$$missing (sudo apt-get install$$missing)" >&2; exit 1; }
	$(PY) -m lipsync.server.cluster start

cluster-stop:
	$(PY) -m lipsync.server.cluster stop

# What CI runs (.ci/run): the linter, then every test.
test: install-dev lint
	$(PY) -m pytest

# The quick loop while developing: no linter, no tests marked slow.
test-fast: install-dev
	$(PY) -m pytest -m "not slow"

lint: install-dev
	$(VENV)/bin/ruff check .

bench: install
	$(PY) bench/bench_builtin.py
	$(PY) bench/bench_pipeline.py
	$(PY) bench/bench_streaming.py

clean:
	rm -rf $(VENV) .cache outputs/tmp .pytest_cache *.egg-info
