# One command each on a fresh machine: `make test`, `make demo`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROMTOOL := $(VENV)/bin/promtool

.PHONY: install test test-fast demo lint typecheck clean

install: $(STAMP) $(PROMTOOL)

# torch is pinned to the CPU build that lies on disk; it is installed before the
# project so that the project's `torch>=` range is already satisfied and pip never
# reaches for a CUDA build.
$(STAMP): pyproject.toml
	@# systemd-analyze validates deploy/systemd in the tests (in Debian's systemd package).
	command -v systemd-analyze >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c "import weightcache, torch; assert torch.__version__.startswith(\"2.13.0\"), torch.__version__"
	touch $@

# promtool checks and unit-tests deploy/prometheus in the tests (Debian's prometheus
# package). Unpacked from the .deb rather than installed: installing the package adds
# a system user and, where systemd runs, enables and starts a Prometheus server on
# :9090; no maintainer script runs here, and promtool needs nothing but libc.
$(PROMTOOL):
	mkdir -p $(@D)
	tmp=$$(mktemp -d) && chmod 755 $$tmp && \
	  (cd $$tmp && { apt-get download prometheus 2>/dev/null || \
	    { apt-get update -qq && apt-get download prometheus; }; }) && \
	  dpkg-deb -x $$tmp/prometheus_*.deb $$tmp/root && \
	  install -m 0755 $$tmp/root/usr/bin/promtool $@ && rm -rf $$tmp
	$@ --version

test: $(STAMP) $(PROMTOOL)
	$(PY) -m pytest

# Everything but the slow scenarios (crash loops, storms, the demo): a quick check.
test-fast: $(STAMP) $(PROMTOOL)
	$(PY) -m pytest -m "not slow"

demo: $(STAMP)
	$(PY) -m weightcache demo

lint: $(STAMP)
	$(VENV)/bin/ruff check weightcache client tests loadtest
	$(VENV)/bin/mypy weightcache

clean:
	rm -rf $(VENV) build *.egg-info
