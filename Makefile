# One command each on a fresh machine: `make test`, `make demo`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo lint typecheck clean

install: $(STAMP)

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

test: $(STAMP)
	$(PY) -m pytest

# Everything but the slow scenarios (crash loops, storms, the demo): a quick check.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

demo: $(STAMP)
	$(PY) -m weightcache demo

lint: $(STAMP)
	$(VENV)/bin/ruff check weightcache client tests loadtest
	$(VENV)/bin/mypy weightcache

clean:
	rm -rf $(VENV) build *.egg-info
