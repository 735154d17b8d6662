# scorescope: two commands do everything — `make demo` and `make test` (each sets up .venv first if needed).
#
# torch is pinned to the CPU build through a constraints file; GPU users override it:
#   make test TORCH_CONSTRAINT=            # let pip pick torch (e.g. a CUDA build)
#   make test TORCH_CONSTRAINT=my-constraints.txt

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH_CONSTRAINT ?= constraints-cpu.txt
DEMO_OUT ?= scorescope-demo
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml $(TORCH_CONSTRAINT)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH_CONSTRAINT),PIP_CONSTRAINT=$(abspath $(TORCH_CONSTRAINT)),) $(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/scorescope demo --out $(DEMO_OUT)

test: $(STAMP)
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/bench_capture.py
	$(BIN)/python bench/bench_probes.py
	$(BIN)/python bench/bench_clevr.py
	$(BIN)/python bench/bench_interventions.py --out docs/bench/interventions.json

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
