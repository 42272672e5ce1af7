# The two commands of the README: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
# CPU wheel on a plain machine; override for CUDA, e.g. `make test TORCH_SPEC="torch==2.13.0 --index-url ..."`.
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.skipvlm-installed

.PHONY: demo test test-slow test-all lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch goes in first and pinned, so that nothing later resolves it to a multi-GB CUDA build.
# Every package is installed at the exact version of constraints.txt: the set the suite passed with.
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

$(STAMP): $(PY) pyproject.toml constraints.txt
	@echo "installing torch and skipvlm's pinned dependencies into $(VENV) (a few minutes the first time)"
	$(PIP) $(TORCH_SPEC)
	$(PIP) -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/skipvlm demo

test: $(STAMP)
	@echo "running the default suite (about 2 minutes on 2 idle cores); pytest prints a dot per test"
	$(PY) -m pytest -m "not slow and not gpu"

test-slow: $(STAMP)
	$(PY) -m pytest -m "slow and not gpu"

test-all: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/skip_runtime.py
	$(PY) benchmarks/eas_merge.py
	$(PY) benchmarks/token_exit.py
	$(VENV)/bin/skipvlm bench --preset llama-cpu --skip-attention-counts 0,4,6,8 --methods stock,lora,pia,eas --device cpu

clean:
	rm -rf $(VENV) build .pytest_cache .ruff_cache src/*.egg-info
