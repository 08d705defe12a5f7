# Fresh machine to running code: `make demo`, `make test`, `make bench`.
# Everything goes into a local virtual environment (.venv) built against torch==2.13.0 (CPU wheel).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MAX_JOBS ?= 2
export MAX_JOBS

# Third-party plugin packages shipped as examples: installed (found through their entry points) and tested.
PLUGINS := ./plugins/distillx-example ./plugins/distillx-rkd ./plugins/distillx-svd

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cuda/*.cu csrc/include/distillx/*.h csrc/include/distillx/cpu/*.h csrc/include/distillx/cuda/*.cuh)

.PHONY: setup demo test bench clean

# Editable install: the compiled core is built into distillx/ so tests run against the kernels.
$(BIN)/distillx: $(SOURCES)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0 setuptools wheel ninja
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[plot]"
	touch $@

setup: $(BIN)/distillx

demo: setup
	$(BIN)/distillx demo

test: setup
	$(BIN)/python -m pip install -q pytest hypothesis "transformers>=4.40" "accelerate>=0.26" "tensorboard>=2.10" \
		"peft>=0.10" "datasets>=2.14" trl==1.16.0 torch==2.13.0
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps $(PLUGINS)
	DISTILLX_REQUIRE_COMPILED=1 $(BIN)/python -m pytest -q tests $(addsuffix /tests,$(PLUGINS))

bench: setup
	$(BIN)/distillx bench --json bench.json

clean:
	rm -rf build $(VENV) distillx/_C*.so distillx/_cpu_*.so *.egg-info
