# `make demo` runs the pipeline on the built-in demo; `make test` runs the tests.
# Each creates .venv when it is missing or pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)

# Offline everywhere: no hub lookups (they hang ~50 s before failing), no update checks, no wandb.
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled

.PHONY: venv demo test bench clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# DS_BUILD_OPS=0: DeepSpeed's CUDA ops are built at run time on a GPU node, not here
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

demo: venv
	$(PY) -m examples.demo

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/download.py
	$(PY) benchmarks/caption.py
	$(PY) benchmarks/train.py

clean-demo:
	rm -rf runs/demo
