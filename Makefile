# Everything a fresh machine needs: `make demo` and `make test` install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch; override e.g. TORCH_SPEC="torch==2.13.0" or a CUDA build where one exists.
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= out/demo

.PHONY: install demo test bench-io bench-speed bench-quality clean

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

test: install
	$(BIN)/python -m pytest -q tests

bench-io: install
	$(BIN)/python benchmarks/io_bench.py

bench-speed: install
	$(BIN)/python benchmarks/speed.py

bench-quality: install
	$(BIN)/python benchmarks/quality.py

clean:
	rm -rf out bench-out .pytest_cache
