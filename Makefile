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

.PHONY: venv demo test lint bench clean-demo slurm-packages browser-packages

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

test: venv slurm-packages browser-packages lint
	$(PY) -m pytest -q

# ruff (pinned in the test extra): the lint rules and the formatting in pyproject.toml
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The SLURM tests start a one-node slurm-wlm on localhost (tests/slurm/); install it when missing.
# Not fatal: without root or apt the SLURM tests skip and say why.
SLURM_PACKAGES := slurmctld slurmd slurm-client munge
slurm-packages:
	@command -v slurmctld >/dev/null 2>&1 || { \
	  apt-get install -y -q --no-install-recommends $(SLURM_PACKAGES) >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends $(SLURM_PACKAGES) >/dev/null 2>&1; } || \
	  echo "note: could not install $(SLURM_PACKAGES); the SLURM tests will be skipped"; }

# The inspect page's test renders it in Debian's headless chromium; install it when missing.
# Not fatal: without root or apt that test skips and says why.
browser-packages:
	@command -v chromium >/dev/null 2>&1 || { \
	  apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } || \
	  echo "note: could not install chromium; the inspect page's browser test will be skipped"; }

bench: venv
	$(PY) benchmarks/download.py
	$(PY) benchmarks/caption.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/fidelity.py

clean-demo:
	rm -rf runs/demo
